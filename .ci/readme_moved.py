"""Check that the old README's text moved into the docs: every table row, and every other line.

    python .ci/readme_moved.py OLD_README [--rows-only]

Issue 26 cut the README to a summary; its tables and explanations moved to docs/*.md. This
compares the old README (e.g. `git show 562135b:README.md > /tmp/old.md`) line by line with
docs/**/*.md and the new README.md, ignoring link targets (pages moved, so links changed) and
whitespace. Exit 1 and list the lines not found.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def norm(text: str) -> str:
    """Link targets dropped, whitespace collapsed."""
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"\s+", " ", text).strip()


def main() -> int:
    old = Path(sys.argv[1]).read_text().splitlines()
    rows_only = "--rows-only" in sys.argv
    pages = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    have = norm("\n".join(p.read_text() for p in pages))
    fence = False
    missing, checked = [], 0
    for n, line in enumerate(old, 1):
        if line.startswith("```"):
            fence = not fence
        s = norm(line)
        if not s or (line.startswith("#") and not fence) or (rows_only and not s.startswith("|")):
            continue  # headings were re-levelled
        checked += 1
        if s not in have:
            missing.append((n, line))
    for n, line in missing:
        print(f"line {n} not found: {line[:100]}")
    print(f"{checked - len(missing)} of {checked} lines found in docs/ or README.md")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
