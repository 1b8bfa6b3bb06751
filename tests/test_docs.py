"""The documentation: the site builds strictly (no broken link, anchor or API reference), the
README's relative links and anchors resolve, and docs/cli.md is the parser's current table."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The pinned mkdocs stack (pyproject's `docs` extra) needs Python 3.11+; CI runs 3.11.
needs_docs_stack = pytest.mark.skipif(sys.version_info < (3, 11), reason="the docs extra needs Python 3.11+")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """The anchor GitHub and mkdocs' toc give a heading (lower case, punctuation dropped, spaces to -)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set:
    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    out = set()
    for m in re.finditer(r"^#{1,6} (.+?)\s*$", text, re.M):
        explicit = re.search(r"\{#([\w-]+)\}$", m.group(1))
        out.add(explicit.group(1) if explicit else _slug(m.group(1)))
    return out


def _links(md: Path) -> list:
    return LINK.findall(FENCE.sub("", md.read_text(encoding="utf-8")))


def test_readme_links_resolve():
    readme = ROOT / "README.md"
    links = _links(readme)
    assert len(links) >= 10, "README.md should link into docs/"
    bad = []
    for target in links:
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (readme.parent / path).resolve() if path else readme
        if not file.is_file():
            bad.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, "README.md has broken links:\n" + "\n".join(bad)


def test_readme_links_check_catches_a_broken_one(tmp_path):
    # The link reader must see links the way the test above relies on (not inside code blocks).
    md = tmp_path / "x.md"
    md.write_text("# Top\n\n[a](docs/nope.md) [b](#top) ![img](i.png)\n```\n[c](inside.md)\n```\n")
    assert _links(md) == ["docs/nope.md", "#top"]
    assert _anchors(md) == {"top"}


@needs_docs_stack
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    # Every page of the nav was written, and the API pages hold what their modules define (an empty
    # page would mean the sources were not found, which mkdocstrings does not always report).
    for page in ("install", "usage", "cli", "nad", "neat", "nex", "neureasoner", "server", "lmeval", "architecture",
                 "reliability", "results", "packaging", "embedding"):
        assert (site / page / "index.html").is_file(), page
    expect = {"neurotap": ["neurotap.load", "neurotap.Model.generate"],
              "model": ["neurotap.runtime.model.Model.start_sampling", "neurotap.runtime.model.load"],
              "sampling": ["neurotap.runtime.sampling.SampleRun.advance", "neurotap.runtime.sampling.Sample"],
              "nad": ["neurotap.methods.nad.best_of_n", "neurotap.methods.nad.select"],
              "neat": ["neurotap.methods.neat.calibrate", "neurotap.methods.neat.load_calibration"],
              "neureasoner": ["neurotap.methods.neureasoner.calibrate"],
              "nex": ["neurotap.scoring.nex.nex_scores"],
              "selectors": ["neurotap.scoring.selectors.select_knn", "neurotap.scoring.selectors.select_dbscan"],
              "native": ["neurotap._native.Model", "neurotap._native.Run"]}
    for page, ids in expect.items():
        html = (site / "api" / page / "index.html").read_text(encoding="utf-8")
        missing = [i for i in ids if f'id="{i}"' not in html]
        assert not missing, f"api/{page}: no entry for {missing}"


def test_cli_page_is_current():
    from gen_cli_doc import commands, render

    from neurotap.apps.cli import build_parser

    parser = build_parser()
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert render(parser) == current, "docs/cli.md is stale: python tests/gen_cli_doc.py > docs/cli.md"
    # The README's table of commands is written by hand: it must name every command there is.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = [line for line in readme.splitlines() if line.startswith("| `neurotap ")]
    missing = [c for c in commands(parser) if not any(line.startswith(f"| `{c}") for line in table)]
    assert not missing, f"README.md's table of commands lacks {missing}"
