"""The documentation holds together: every `docs/<page>.md` cited in code, configs, scripts or
Markdown exists, every `#anchor` it names is a heading there, relative Markdown links resolve, no
file cites notes that are not in the repository, and the README stays a front page.

Pure file reading, no imports of the package: well under a second.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".md"}
# Top-level folders holding the repository's own text. data/ is also where datasets are
# downloaded, so only its own files are read, not its subfolders.
SOURCE_DIRS = ("at", "attacks", "models", "eval", "configs", "sh", "bench", "tests", "docs", ".ci")
FLAT_DIRS = ("data",)
README_MAX_LINES = 160

# Pages written on other branches and linked from the README ahead of their arrival. While one of
# them is absent its links are not checked; once it exists it is checked like any other page.
PENDING_PAGES = {"docs/reporting.md", "docs/device_check.md", "docs/sweeps.md"}

CITATION = re.compile(r"(?<![\w/.-])(docs/[\w./-]+?\.md)(?:#([\w-]+)|\s?§\s?([\w-]+))?")
# Notes that live outside the repository; they may only be named as a page under docs/.
OUTSIDE_NOTE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*)"
                          r"(algorithms|performance|evaluation|conventions)\.md")
# "The specification" was an outside note too; the pattern is split so this file does not match.
SPEC = re.compile("specification" + r"'s table|\bthe " + "specification" + r"\b")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def repo_files() -> list[Path]:
    files = [p for p in ROOT.iterdir() if p.is_file() and p.suffix in SUFFIXES]
    for name in FLAT_DIRS:
        folder = ROOT / name
        files += [p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES]
    for name in SOURCE_DIRS:
        files += [p for p in (ROOT / name).rglob("*")
                  if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return sorted(files)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Anchors of a Markdown page's headings (outside fenced code), numbered like GitHub's."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


FILES = repo_files()
TEXTS = {rel(p): p.read_text(encoding="utf-8") for p in FILES}
MARKDOWN = [name for name in TEXTS if name.endswith(".md")]


def test_the_scan_sees_the_code_and_the_docs():
    # Guards the test itself: a wrong root or suffix list would make every check below vacuous.
    assert "README.md" in TEXTS and "at/losses.py" in TEXTS and "configs/base.yaml" in TEXTS
    assert "docs/reference.md" in TEXTS and "data/loader.py" in TEXTS
    assert sum(len(CITATION.findall(text)) for text in TEXTS.values()) >= 50


def test_every_cited_docs_page_and_section_exists():
    problems = []
    for name, text in TEXTS.items():
        for page, anchor, section in CITATION.findall(text):
            target = ROOT / page
            if not target.is_file():
                if page not in PENDING_PAGES:
                    problems.append(f"{name}: cites {page}, which does not exist")
                continue
            wanted = anchor or section
            if wanted and slug(wanted) not in anchors(target):
                problems.append(f"{name}: cites {page}#{wanted}, which is not a heading there")
    assert not problems, "\n".join(problems)


def test_relative_markdown_links_resolve():
    problems = []
    for name in MARKDOWN:
        source = ROOT / name
        for target in LINK.findall(FENCE.sub("", TEXTS[name])):
            if re.match(r"[a-z][\w+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            page = (source.parent / path).resolve() if path else source
            if not page.exists():
                if rel(page) not in PENDING_PAGES:
                    problems.append(f"{name}: link to {target}, which does not exist")
                continue
            if anchor and page.suffix == ".md" and anchor not in anchors(page):
                problems.append(f"{name}: link to {target}, whose anchor is not a heading")
    assert not problems, "\n".join(problems)


def test_no_citation_of_notes_outside_the_repository():
    problems = []
    for name, text in TEXTS.items():
        for match in OUTSIDE_NOTE.finditer(text):
            folder, note = match.group(1), match.group(2)
            if folder == "docs/":
                continue  # a page of this repository; whether it exists is checked above
            if not folder and name.startswith("docs/") and (ROOT / "docs" / f"{note}.md").is_file():
                continue  # a relative link between pages of docs/
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{name}:{line}: cites {match.group(0)}, not in the repository")
        for match in SPEC.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{name}:{line}: cites {match.group(0)!r}, not in the repository")
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page_with_the_test_command():
    readme = TEXTS["README.md"]
    lines = len(readme.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"
    assert "bash sh/test.sh" in readme  # CI runs the README's test command
    assert "bash sh/test.sh --fast" in readme


@pytest.mark.parametrize("heading, expected", [
    ("IKL and GKL", "ikl-and-gkl"),
    ("wMSE in O(BC)", "wmse-in-obc"),
    ("AutoAttack resume", "autoattack-resume"),
    ("`speed` options", "speed-options"),
    ("Reference behaviour that is selectable rather than copied",
     "reference-behaviour-that-is-selectable-rather-than-copied"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected
