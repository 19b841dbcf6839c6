"""Every relative link of the documentation (README.md, docs/*.md, build-support/*/README.md) reaches a file of the
repository, and every #anchor a heading of that file: a moved or renamed section fails here, not in a reader's
browser."""

from __future__ import annotations

import re
from pathlib import Path

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _documents(root: Path) -> list[Path]:
    return sorted([root / "README.md", *root.glob("docs/*.md"), *root.glob("build-support/*/README.md")])


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    text = _FENCE.sub("", document.read_text(encoding="utf-8"))
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken_links(root: Path) -> list[str]:
    broken = []
    for document in _documents(root):
        for target in _LINK.findall(_FENCE.sub("", document.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not ours to check offline
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            where = f"{document.relative_to(root)}: {target}"
            if not linked.is_file():
                broken.append(f"{where} (no such file)")
            elif anchor and anchor not in _anchors(linked):
                broken.append(f"{where} (no such heading)")
    return broken


def test_every_relative_link_of_the_documentation_resolves() -> None:
    assert len(_documents(Path.cwd())) >= 5  # README, docs and the build-support READMEs are all in the scan
    assert broken_links(Path.cwd()) == []


def test_a_missing_file_or_heading_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Every setting\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#every-setting) [gone](docs/b.md) [moved](docs/a.md#operating) [web](https://x.y/z)\n"
        "```\n[in a fence](nowhere.md)\n```\n"
    )
    assert broken_links(tmp_path) == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#operating (no such heading)",
    ]
