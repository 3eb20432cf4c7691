"""Every relative link of the documentation reaches a file of the repository, and every anchor a heading there."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``doc``: lower case, punctuation but '-' and '_' dropped, spaces
    made '-'."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # not http:, mailto:...


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert doc.is_file()
    broken = []
    for target in links(doc):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        missing = not file.exists() or ROOT not in file.parents
        if missing or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{doc.name}: links to nothing: {broken}"


def test_the_link_check_sees_links():
    """The check reads the links it should: the README's to the docs, with their anchors."""
    found = links(ROOT / "README.md")
    assert "docs/transformers.md" in found and "BENCHMARKS.md" in found
    assert "text-models-hugging-face-transformers" in anchors(ROOT / "README.md")
    assert "../README.md#text-models-hugging-face-transformers" in links(ROOT / "docs" / "transformers.md")
