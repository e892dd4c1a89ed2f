"""The documentation site: `mkdocs build --strict` passes, every page is in the nav, links resolve.

The strict build fails on a broken link or anchor between pages, a nav entry without a page, a page
left out of the nav and an API-reference entry (mkdocstrings) that does not resolve. The link check
below also covers what mkdocs does not read: README.md and links into the repository outside docs/.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml names a Python callable (`!!python/object/apply:...`); it is not needed here
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _nav_pages(nav) -> list[str]:
    out: list[str] = []
    if isinstance(nav, str):
        out.append(nav)
    elif isinstance(nav, list):
        for item in nav:
            out += _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            out += _nav_pages(value)
    return out


def _hooks():
    spec = importlib.util.spec_from_file_location("modeldiff_docs_hooks", DOCS / "_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    # the API reference was generated from docstrings, the doctests as code
    diff_page = (site / "reference" / "diff" / "index.html").read_text(encoding="utf-8")
    assert 'id="modeldiff.diff.diff_latents"' in diff_page
    assert 'class="gp">&gt;&gt;&gt; </span>' in diff_page
    # pages generated from files outside docs/
    bench = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "bench_diff.py" in bench
    for page in _hooks().tutorial_pages().values():
        assert (site / page.removesuffix(".md") / "index.html").exists(), page


def test_every_page_is_in_the_nav():
    nav = set(_nav_pages(_mkdocs_config()["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    hooks = _hooks()
    generated = set(hooks.GENERATED.values()) | set(hooks.tutorial_pages().values())
    assert sorted(on_disk - nav) == [], "pages missing from the nav in mkdocs.yml"
    assert sorted(generated - nav) == [], "generated pages (benchmarks, tutorials) missing from nav"
    assert sorted(nav - on_disk - generated) == [], "nav entries without a page"


def test_every_public_module_has_an_api_reference_page():
    package = ROOT / "src" / "modeldiff"
    modules = [p.stem for p in package.glob("*.py") if not p.name.startswith("_")]
    subpackages = [p.parent.name for p in package.glob("*/__init__.py")]
    public = {"modeldiff", *(f"modeldiff.{name}" for name in modules + subpackages)}
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (modeldiff(?:\.\w+)?)\s*$", pages, re.MULTILINE))
    assert sorted(public - documented) == [], "modules without a page in docs/reference/"


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _anchors(path: Path) -> set[str]:
    from pymdownx.slugs import slugify

    slug = slugify(case="lower")  # mkdocs.yml's slugify: GitHub's anchors
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(h, "-") for h in _HEADING.findall(text)}


def _markdown_files() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted(DOCS.rglob("*.md")),
        ROOT / "benchmarks" / "README.md",
        ROOT / "tutorials" / "README.md",
    ]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    text = _CODE.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert broken == [], f"{path.relative_to(ROOT)}: broken links"
