"""The docs cannot rot: links resolve, code blocks that claim to run do run, the API page matches the code."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(
    [os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")]
    + [os.path.join(ROOT, f) for f in ("README.md", "benchmarks/README.md", "studies/README.md")]
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
RUNNABLE = re.compile(r"^```python runnable\n(.*?)^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower-case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # '#' lines inside code are not headings
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _inside_repo(path: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), ROOT]) == ROOT


# What ships: the package, its docs, examples, benchmarks and studies, the README and the changelog.
SHIPPED_DIRS = ("peft_ortho", "docs", "examples", "benchmarks", "studies")
SHIPPED = sorted(
    [os.path.join(ROOT, f) for f in ("README.md", "CHANGELOG.md", "pyproject.toml")]
    + [
        os.path.join(folder, f)
        for d in SHIPPED_DIRS
        for folder, _, files in os.walk(os.path.join(ROOT, d))
        for f in files
        if f.endswith((".py", ".md", ".toml", ".txt", ".json", ".sh"))
    ]
)
# Internal notes that live outside the repository, and absolute paths of the machines it was written on.
FOREIGN = re.compile(r"METHODS\.md|DESIGN\.md|\.\./shared\b|(?<![\w.])/(?:work|home|tmp|Users|mnt|root)/\w")
RELATIVE = re.compile(r"(?<![\w/.@])((?:\.\./)+[\w.\-/]*)")  # not after "@": a refused Hub revision


@pytest.mark.parametrize("path", SHIPPED, ids=_rel)
def test_no_shipped_file_references_a_path_outside_the_repository(path):
    """Shipped code and docs stand alone: no internal notes (METHODS.md, DESIGN.md, ../shared), no absolute paths of
    a developer's machine, no relative path that climbs out of the repository."""
    text = open(path, encoding="utf-8").read()
    found = [m.group(0) for m in FOREIGN.finditer(text)]
    found += [
        m.group(1)
        for m in RELATIVE.finditer(text)
        if not _inside_repo(os.path.normpath(os.path.join(os.path.dirname(path), m.group(1))))
    ]
    assert not found, f"{_rel(path)} references paths outside the repository: {sorted(set(found))}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    text = open(page, encoding="utf-8").read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    broken = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not _inside_repo(path):
            broken.append(f"{target} (outside the repository)")
        elif not os.path.exists(path):
            broken.append(f"{target} (no such file)")
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(f"{target} (no heading '#{anchor}')")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


def test_every_docs_page_is_reachable_from_the_index():
    index = open(os.path.join(DOCS, "index.md"), encoding="utf-8").read()
    linked = {m.group(1).partition("#")[0] for m in LINK.finditer(index) if m.group(1)}
    pages = {os.path.basename(p) for p in PAGES if os.path.dirname(p) == DOCS} - {"index.md"}
    assert not pages - linked, f"docs pages missing from docs/index.md: {sorted(pages - linked)}"


BLOCKS = [
    pytest.param(page, i, code, id=f"{_rel(page)}#{i}")
    for page in PAGES
    for i, code in enumerate(m.group(1) for m in RUNNABLE.finditer(open(page, encoding="utf-8").read()))
]


@pytest.mark.parametrize("page, index, code", BLOCKS)
def test_runnable_code_blocks_run(page, index, code, tmp_path):
    """Every block fenced as ```python runnable runs offline, in a fresh interpreter, in an empty folder."""
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{_rel(page)} block {index} failed:\n{result.stderr[-3000:]}"


def test_api_reference_is_current():
    result = subprocess.run(
        [sys.executable, os.path.join(DOCS, "gen_api.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
