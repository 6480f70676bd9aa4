"""The documentation's relative links resolve (files, and anchors by GitHub's heading slugs), the README
stays short, and neither it nor docs/ carries a dated figure. Absolute http(s) links are not fetched."""

import functools
import glob
import os
import re
import unicodedata

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINKING = [
    README,
    *DOCS,
    os.path.join(REPO, "benchmarks", "README.md"),
    os.path.join(REPO, "benchmarks", "RESULTS.md"),
]
MAX_README_LINES = 200

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
ISO_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")


def prose_lines(path: str):
    """(line number, text) of the lines outside fenced and indented code blocks. (A list item's
    paragraph indented by four spaces after a blank line counts as code: its links go unchecked.)"""
    fence = None
    previous_blank, in_indented = True, False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f.read().splitlines(), 1):
            opening = FENCE.match(line)
            if fence:
                if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                    fence = None
                continue
            if opening:
                fence = opening.group(1)
                continue
            if not line.strip():
                previous_blank = True
                continue
            indented = line.startswith(("    ", "\t"))
            in_indented = indented and (previous_blank or in_indented)
            previous_blank = False
            if not in_indented:
                yield number, line


def heading_text(raw: str) -> str:
    """What GitHub renders of a heading's inline markdown: code spans' text, links' text, no emphasis."""
    parts = re.split(r"(`+[^`]*?`+)", raw)
    out = []
    for part in parts:
        if part.startswith("`"):
            out.append(part.strip("`").strip())
            continue
        part = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", part)  # links and images: their text
        part = re.sub(r"<[^>]+>", "", part)  # inline HTML
        part = re.sub(r"(?<![\w\\])_+|_+(?![\w])", "", part)  # _emphasis_, not snake_case
        out.append(part)
    return "".join(out).strip()


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lowercase; letters, digits, marks, '_', '-' and spaces kept, the rest
    dropped; every space becomes '-' (runs are not collapsed)."""
    kept = []
    for ch in text.lower():
        category = unicodedata.category(ch)
        if ch in "_- " or category[0] in "LN" or category in ("Mn", "Mc"):
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@functools.cache
def anchors(path: str) -> frozenset:
    """Every anchor a markdown file offers: heading slugs, duplicates numbered -1, -2, ... as GitHub
    does, and explicit <a id/name> anchors."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        found.update(HTML_ANCHOR.findall(line))
        m = ATX_HEADING.match(line)
        if not m:
            continue
        base = github_slug(heading_text(m.group(1) or ""))
        slug = base
        while slug in seen:
            seen[base] += 1
            slug = f"{base}-{seen[base]}"
        seen[slug] = 0
        found.add(slug)
    return frozenset(found)


def links(path: str):
    """(line number, target) of every link in the file's prose, inline or reference-style."""
    for number, line in prose_lines(path):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            yield number, definition.group(1)
            continue
        text = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in INLINE_LINK.finditer(text):
            yield number, m.group(2)


def broken(path: str, target: str) -> str | None:
    """Why a relative link does not resolve, or None."""
    if SCHEME.match(target) or target.startswith("//"):
        return None  # absolute (http, https, mailto): not fetched
    file_part, _, anchor = target.partition("#")
    destination = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    if not os.path.exists(destination):
        return f"{os.path.relpath(destination, REPO)} does not exist"
    if anchor and destination.endswith(".md") and anchor not in anchors(destination):
        return f"{os.path.relpath(destination, REPO)} has no heading with the anchor #{anchor}"
    return None


def rel(path: str) -> str:
    return os.path.relpath(path, REPO)


@pytest.mark.parametrize("path", LINKING, ids=rel)
def test_relative_links_resolve(path):
    problems = [
        f"{rel(path)}:{number}: ({target}) {why}"
        for number, target in links(path)
        if (why := broken(path, target))
    ]
    assert not problems, "\n".join(problems)


def test_readme_is_at_most_200_lines():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {MAX_README_LINES} and move detail to docs/"
    )


def test_every_docs_page_is_in_the_index():
    index = os.path.join(REPO, "docs", "README.md")
    linked = {os.path.normpath(os.path.join(REPO, "docs", t.partition("#")[0])) for _, t in links(index)}
    missing = [rel(p) for p in DOCS if p != index and p not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=rel)
def test_no_dated_figures(path):
    """Dated measurements live in benchmarks/RESULTS.md; the README and docs link its sections."""
    dated = [f"{rel(path)}:{n}: {line.strip()}" for n, line in prose_lines(path) if ISO_DATE.search(line)]
    assert not dated, "move these to benchmarks/RESULTS.md and link the section:\n" + "\n".join(dated)


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("FSDP: `--config.param_sharding=fsdp`", "fsdp---configparam_shardingfsdp"),
        (
            "Issue 11's targets on this CPU: the closing sequence",
            "issue-11s-targets-on-this-cpu-the-closing-sequence",
        ),
        (
            "2026-11-25, evening: 2-core AMD EPYC, after oneDNN dots and the (B*H, L, K) buffers",
            "2026-11-25-evening-2-core-amd-epyc-after-onednn-dots-and-the-bh-l-k-buffers",
        ),
        ("Sampling: `bench_sample.py`", "sampling-bench_samplepy"),
        ("Weight types: `--weights`", "weight-types---weights"),
        ("The [seed](seed.md) and _its_ recipe ×2", "the-seed-and-its-recipe-2"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading_text(heading)) == slug


def test_duplicate_headings_are_numbered(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A\n## Training\n```\n## Training\n```\n    # not a heading\n## Training\n### Training\n"
    )
    assert anchors(str(page)) == {"a", "training", "training-1", "training-2"}
