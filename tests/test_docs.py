"""The documentation stands with the code: every anchor of docs/design.md cited anywhere is a heading
of docs/design.md, every file path the README and docs name exists, and every script a user runs
answers --help."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [p for pattern in ("longctx/**/*.py", "tests/*.py", "scripts/*", "tools/**/*.py", "configs/**/*.yaml",
                             "README.md", "docs/*.md", "train.py")
           for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_cited_design_anchor_exists():
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", open(os.path.join(ROOT, "docs", "design.md")).read(), re.M)}
    cited = {(os.path.relpath(p, ROOT), a) for p in SOURCES for a in re.findall(r"docs/design\.md#([\w-]+)", open(p).read())}
    assert cited, "nothing cites docs/design.md"
    assert [c for c in cited if c[1] not in headings] == []


def test_files_named_in_the_docs_exist():
    named = set()
    for doc in ["README.md", *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        text = open(os.path.join(ROOT, doc)).read()
        named |= set(re.findall(r"\b((?:longctx|scripts|tools|configs|docs|tests)/[\w/.-]*\w)", text))
    missing = [p for p in named if not glob.glob(os.path.join(ROOT, p) + "*")]
    assert named and missing == []


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))), ids=os.path.basename)
def test_user_scripts_answer_help(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    first = open(script).read().split('"""')[1].splitlines()[0]
    assert first.rstrip(".") in " ".join(out.stdout.split()), out.stdout
