"""Run `ifmvse extract` as one process of a test job; IFMVSE_TEST_ITEM_DELAY slows this one.

A real pause of the decode path (seconds per audio item) makes one process reliably slower than
its peers while its heartbeat keeps going, as a busy or slower host would be.
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
    sys.exit(cli(["extract", *sys.argv[1:]], prog_name="ifmvse"))
