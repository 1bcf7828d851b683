"""Drive `ifmvse extract --engine ray` on an embedded local Ray, with a shard that dies once.

With IFMVSE_TEST_DIE_ONCE=PATH, the first Ray worker to decode its 17th audio item (past its first backbone) creates PATH
and ends its process at once (`os._exit(1)`, as a SIGKILL or a lost node would), after it has
written some journal files; Ray must retry that shard to a complete store.
"""

import itertools
import os
import sys
from pathlib import Path


def die_once() -> None:
    """Ray worker set-up hook: patch the decode path to kill this worker once (see above)."""
    marker = os.environ.get("IFMVSE_TEST_DIE_ONCE")
    if not marker:
        return
    import jax_ifmvse.stream as stream

    load_item, calls = stream.load_item, itertools.count()

    def dying(*args, **kw):
        if next(calls) == 16:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        return load_item(*args, **kw)

    stream.load_item = dying


if __name__ == "__main__":
    import ray

    from jax_ifmvse.cli import cli

    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": "ray_job.die_once"},
    )
    sys.exit(cli(["extract", *sys.argv[1:]], prog_name="ifmvse"))
