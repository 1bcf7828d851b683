"""The README stays a short summary, and no relative link of the README or the docs is broken."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_CHARS = 12_000  # issue 26: the details live in docs/
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _slug(heading: str) -> str:
    """The anchor MkDocs' toc extension gives a heading (and GitHub, for these headings)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"[\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no links inside code
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text())
    assert n <= README_MAX_CHARS, f"README.md has {n} characters (at most {README_MAX_CHARS})"


def test_readme_keeps_the_ci_test_command():
    """CI (.ci/run) runs the README's test command; both must say the same."""
    assert ".venv/bin/just test\n" in (ROOT / "README.md").read_text()
    assert "\n.venv/bin/just test\n" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{page.relative_to(ROOT)}: broken links: {bad}"


def test_every_docs_page_is_in_the_nav():
    """MkDocs' strict build fails on a page left out of `nav`: say which, without MkDocs."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for n in node:
                yield from walk(n)
        elif isinstance(node, dict):
            for n in node.values():
                yield from walk(n)

    listed = set(walk(nav))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages - listed == set(), f"add to mkdocs.yml nav: {sorted(pages - listed)}"
    assert listed - pages == set(), f"nav names missing pages: {sorted(listed - pages)}"


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` (what `just docs` runs; CI's one docs build), when the `docs` extra
    is installed: CI (`CI` set, `.ci/run` installs the extra) never skips it."""
    if not os.environ.get("CI"):
        pytest.importorskip("mkdocs_click", reason="the `docs` extra is not installed")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "s")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cli_html = (tmp_path / "s" / "cli" / "index.html").read_text()
    for command in ("ifmvse-extract", "ifmvse-train", "ifmvse-store-finalize", "ifmvse-serve"):
        assert f'id="{command}"' in cli_html, command  # generated from the click commands
