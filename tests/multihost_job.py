"""Run `ifmvse ARGS...` as one process of a test job, with test-only slowdowns.

IFMVSE_TEST_ITEM_DELAY (seconds per audio item) pauses the decode path, so a shard is reliably
slower than its peers and a kill lands between its journal files; IFMVSE_TEST_SLOW_MERGE makes
every write of a finalize's merge sleep and marks it with `<store>.in-merge` (see store_job.py),
so a kill lands inside the merge.
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

if __name__ == "__main__":
    if os.environ.get("IFMVSE_TEST_SLOW_MERGE"):
        from store_job import slow_merges

        slow_merges(os.environ["IFMVSE_TEST_SLOW_MERGE"])
    sys.exit(cli(sys.argv[1:], prog_name="ifmvse"))
