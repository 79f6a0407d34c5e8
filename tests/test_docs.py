"""The documentation's links: every relative link in the README, the pages under docs/ and the recipes' READMEs
resolves to a file (and an `#anchor` to a heading of that Markdown file), and the README stays short, with a
table of contents that links its own sections."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 255  # 230 until serving (make serve, the API, security, scaling out) joined the README
TOC_HEADINGS = ("contents", "table of contents")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
# [text](target "title") and ![alt](target); the text may span lines. Reference definitions: [label]: target
INLINE_LINK = re.compile(
    r"!?\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def markdown_files() -> list[Path]:
    """README.md, docs/**/*.md and recipes/*/README.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted(REPO.glob("recipes/*/README.md"))]


def blank(match: re.Match) -> str:
    """The match's text as spaces, newlines kept: offsets and line numbers stay those of the original."""
    return re.sub(r"[^\n]", " ", match.group(0))


def without_code(text: str) -> str:
    """`text` with fenced code blocks and inline code spans blanked (their brackets are not links)."""
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation but '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a Markdown text's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for match in HEADING.finditer(FENCE.sub(blank, text)):
        base = slug(match.group(2))
        count = counts.get(base, 0)
        counts[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    """The link targets of a Markdown text, code excluded."""
    prose = without_code(text)
    return [m.group("target") for m in INLINE_LINK.finditer(prose)] + [
        m.group("target") for m in REFERENCE_LINK.finditer(prose)
    ]


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` that do not resolve, each with the reason."""
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if not target or EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            problems.append(f"{target}: {destination} does not exist")
        elif anchor and destination.is_file() and destination.suffix == ".md":
            if anchor not in anchors(destination.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading of {destination.name} has the anchor #{anchor}")
    return problems


def toc_problems(readme_text: str) -> list[str]:
    """What the README's table of contents lacks: the list itself, or links to its own sections."""
    sections = [
        (m.start(), m.end(), len(m.group(1)), m.group(2)) for m in HEADING.finditer(FENCE.sub(blank, readme_text))
    ]
    toc = next((s for s in sections if s[2] >= 2 and s[3].strip().lower() in TOC_HEADINGS), None)
    if toc is None:
        return ["no table of contents (a '## Contents' section)"]
    end = next((start for start, _, level, _ in sections if start > toc[0] and level <= toc[2]), len(readme_text))
    toc_links = {target[1:] for target in links(readme_text[toc[1] : end]) if target.startswith("#")}
    problems = []
    own = anchors(readme_text)
    problems += [f"the table of contents links #{a}, which is no heading" for a in sorted(toc_links - own)]
    for _, _, level, heading in sections:
        if level == 2 and heading.strip().lower() not in TOC_HEADINGS and slug(heading) not in toc_links:
            problems.append(f"the table of contents does not link the section '{heading}'")
    return problems


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_pages_exist():
    for name in ("recipes.md", "library.md", "after-training.md", "reproduction.md", "contributing.md"):
        assert (REPO / "docs" / name).is_file(), name
    assert (REPO / "docs" / "performance" / "README.md").is_file()


def test_readme_is_short_with_a_table_of_contents():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert toc_problems(text) == []


def test_every_page_is_reachable_from_the_readme():
    readme = REPO / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme.read_text()) if t.partition("#")[0]}
    for page in ("recipes.md", "library.md", "after-training.md", "reproduction.md", "contributing.md"):
        assert (REPO / "docs" / page).resolve() in linked, page
    assert (REPO / "docs" / "performance" / "README.md").resolve() in linked


# The checks themselves: they must catch what they are for.


def test_slugs_follow_github():
    assert slug("Mixed precision and `torch.compile`") == "mixed-precision-and-torchcompile"
    assert slug("Multi-GPU, multi-node, SLURM") == "multi-gpu-multi-node-slurm"
    assert (
        slug("Defaults: the reference implementation's behaviour") == "defaults-the-reference-implementations-behaviour"
    )
    assert slug("hparams_loader and flatten") == "hparams_loader-and-flatten"
    assert anchors("# A\n## B\n## B\n```\n# not a heading\n```\n") == {"a", "b", "b-1"}


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Some section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#some-section) [ok](#page) [web](https://example.org/x) `[code](missing.md)`\n"
        "[gone](missing.md) [bad anchor](other.md#nothing) ![image](img/none.png)\n"
        "```\n[in a block](also_missing.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3
    assert any("missing.md" in p for p in problems) and any("#nothing" in p for p in problems)
    assert any("none.png" in p for p in problems)


def test_a_readme_without_table_of_contents_fails():
    long_readme = "# Title\n\nText.\n\n## Usage\n\nMore.\n\n## License\n\nMIT.\n"
    assert toc_problems(long_readme) == ["no table of contents (a '## Contents' section)"]
    partial = "# Title\n\n## Contents\n\n- [Usage](#usage)\n- [Gone](#gone)\n\n## Usage\n\n## License\n"
    assert toc_problems(partial) == [
        "the table of contents links #gone, which is no heading",
        "the table of contents does not link the section 'License'",
    ]
