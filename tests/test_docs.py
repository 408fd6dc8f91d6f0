"""The docs say what the code says: the lifecycle diagram is one diagram, and every page the
README names exists."""

from __future__ import annotations

import re

from tests.cli import REPO


def _diagram_in_code() -> str:
    src = (REPO / "jobs" / "status.py").read_text()
    start = src.index("      pending --submit--> running")
    block = src[start:src.index("\n\n", start)]
    return "\n".join(line[6:] for line in block.split("\n"))


def test_the_lifecycle_page_shows_the_diagram_of_the_code():
    page = (REPO / "docs" / "lifecycle.md").read_text()
    shown = page.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert shown == _diagram_in_code()


def test_every_page_the_readme_links_exists_and_the_readme_stays_short():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", readme)
    assert links, "the README links its docs"
    for link in links:
        assert (REPO / link).is_file(), link
    assert len(readme.splitlines()) <= 210
