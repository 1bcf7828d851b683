import os
import sys
from pathlib import Path

# Helper scripts used by tests (e.g. store_job.py) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

# In-process CLI tests must not switch on the on-disk XLA cache for the whole session (and fill
# the user's cache with test programs); tests of the cache set IFMVSE_COMPILE_CACHE themselves.
os.environ.setdefault("IFMVSE_COMPILE_CACHE", "off")
