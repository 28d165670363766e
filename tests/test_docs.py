"""The front door: README.md stays short and every relative link of it and of doc/ resolves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "doc").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without code blocks and code spans, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(title) for title in HEADING.findall(FENCE.sub("", page.read_text()))}


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading after ``#``, does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


def test_slug_follows_githubs_anchors():
    assert slug("Checkpoints, resume, faults") == "checkpoints-resume-faults"
    assert slug("6. A dataset of your own format") == "6-a-dataset-of-your-own-format"
    assert slug("Deployment: ONNX, OpenVINO, int8") == "deployment-onnx-openvino-int8"


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "there.md").write_text("# Here\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#here) [gone](gone.md) ![img](gone.png) [no](there.md#nope)\n"
                    "[web](https://example.com/x) `[code](nothing.md)`\n"
                    "```\n[fenced](nothing.md)\n```\n")
    assert broken_links(page) == ["gone.md", "gone.png", "there.md#nope"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_readme_is_read_in_two_minutes():
    assert len((REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_readme_links_every_doc_page():
    readme = (REPO / "README.md").read_text()
    unlinked = [page.name for page in PAGES[1:] if f"(doc/{page.name}" not in readme]
    assert unlinked == []


def test_readme_keeps_the_test_command_ci_calls():
    assert "make test" in (REPO / "README.md").read_text()
