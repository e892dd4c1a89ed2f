"""mkdocs hooks: pages made at build time from files that live outside docs/.

mkdocs reads only docs/. The benchmark numbers live in benchmarks/README.md and the tutorials are
jupytext percent scripts in tutorials/; copying either into docs/ by hand would leave two texts to
keep in step. So the build adds them as generated pages (nothing is written to docs/), and links
that the docs make to them in repository terms (``../benchmarks/README.md``, which is what works
when the Markdown is read on a forge) are pointed at the generated pages.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
# repository path -> the generated page's path inside the site
GENERATED: dict[str, str] = {"benchmarks/README.md": "benchmarks.md"}


def tutorial_pages() -> dict[str, str]:
    """tutorials/<name>.py -> tutorials/<name>.md, for every percent-format tutorial."""
    return {
        f"tutorials/{p.name}": f"tutorials/{p.stem}.md"
        for p in sorted((ROOT / "tutorials").glob("*.py"))
        if "# %%" in p.read_text(encoding="utf-8")
    }


def tutorial_markdown(path: Path) -> str:
    """A percent-format script as a page: markdown cells as text, code cells as code blocks."""
    import jupytext

    nb = jupytext.reads(path.read_text(encoding="utf-8"), fmt="py:percent")
    rel = path.relative_to(ROOT).as_posix()
    parts = []
    for i, cell in enumerate(nb.cells):
        src = cell.source.strip("\n")
        if not src:
            continue
        if cell.cell_type == "markdown":
            parts.append(src)
            if i == 0:
                parts.append(
                    f"*This page is `{rel}`, a [jupytext](https://jupytext.readthedocs.io) percent "
                    "script: run it with `python`, open it as a notebook in JupyterLab or VS Code "
                    f"(`jupytext --to notebook {rel}` writes an `.ipynb`). The test suite executes "
                    "it as a notebook (`tests/test_notebooks.py`).*"
                )
        else:
            parts.append(f"```python\n{src}\n```")
    return "\n\n".join(parts) + "\n"


def on_files(files, config):
    for repo_path, uri in {**GENERATED, **tutorial_pages()}.items():
        path = ROOT / repo_path
        content = (
            tutorial_markdown(path)
            if repo_path.startswith("tutorials/")
            else path.read_text("utf-8")
        )
        files.append(File.generated(config, uri, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    """Point repository-relative links at the pages generated from those files."""
    targets = {**GENERATED, **tutorial_pages()}
    origin = {uri: repo_path for repo_path, uri in targets.items()}
    page_uri = page.file.src_uri
    page_dir = posixpath.dirname(page_uri)
    # the folder, in the repository, of the file this page was made from
    source_dir = posixpath.dirname(origin.get(page_uri, posixpath.join("docs", page_uri)))
    for repo_path, uri in targets.items():
        written = posixpath.relpath(repo_path, source_dir)  # the link as the source file has it
        site = posixpath.relpath(uri, page_dir or ".")
        markdown = markdown.replace(f"]({written})", f"]({site})")
        markdown = markdown.replace(f"]({written}#", f"]({site}#")
    return markdown
