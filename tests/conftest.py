import sys
from pathlib import Path

# Helper scripts used by tests (e.g. store_job.py) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
