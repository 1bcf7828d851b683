"""Run `ifmvse ARGS...` as one process of a test job, with test-only slowdowns.

IFMVSE_TEST_ITEM_DELAY (seconds per audio item) pauses the decode path, so a shard is reliably
slower than its peers and a kill lands between its journal files; IFMVSE_TEST_SLOW_MERGE makes
every write of a finalize's merge sleep and marks it with `<store>.in-merge` (see store_job.py),
so a kill lands inside the merge. IFMVSE_TEST_EIO names an audio file whose every read fails
with EIO (a shared disk that dropped out); IFMVSE_TEST_DIE_BEFORE_FRAMES=K kills the process
(SIGKILL) as it is about to write its K-th frame batch, after that batch's pooled rows.
"""

import os
import sys
import time

import jax_ifmvse.stream as stream
from jax_ifmvse.cli import cli

delay = float(os.environ.get("IFMVSE_TEST_ITEM_DELAY", "0"))
if delay:
    load_item = stream.load_item

    def slow_load_item(*args, **kw):
        time.sleep(delay)
        return load_item(*args, **kw)

    stream.load_item = slow_load_item

eio = os.environ.get("IFMVSE_TEST_EIO")
if eio:
    import errno

    import jax_ifmvse.encode as encode

    read = encode.Loader.__call__

    def failing_read(self, path):
        if os.path.basename(str(path)) == eio:
            raise OSError(errno.EIO, "Input/output error")
        return read(self, path)

    encode.Loader.__call__ = failing_read

die_before = int(os.environ.get("IFMVSE_TEST_DIE_BEFORE_FRAMES", "0"))
if die_before:
    import signal

    import featurestore.frames as frames

    write, calls = frames.FrameWriter.write, []

    def dying_write(self, rows, data):
        calls.append(1)
        if len(calls) == die_before:
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, rows, data)

    frames.FrameWriter.write = dying_write

if __name__ == "__main__":
    if os.environ.get("IFMVSE_TEST_SLOW_MERGE"):
        from store_job import slow_merges

        slow_merges(os.environ["IFMVSE_TEST_SLOW_MERGE"])
    sys.exit(cli(sys.argv[1:], prog_name="ifmvse"))
