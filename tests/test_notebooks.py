"""The tutorials, executed as notebooks: each is a jupytext percent script in tutorials/ that
asserts its key result in a cell, so a tutorial that stops working fails here.

They run with small settings (``MODELDIFF_TUTORIAL_SIZE=tiny``: the persona-world organism's
faster recipe) on an ipykernel of this very python, through nbclient, one kernel per notebook.
The organism comes from the ordinary cache (``$MODELDIFF_CACHE``, default ``~/.cache/modeldiff``):
built once here if missing (a minute or two), then loaded in a fraction of a second, by this test
and by every notebook after it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
KERNEL = "modeldiff-tests"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A kernelspec for this interpreter, found first on JUPYTER_PATH; the tutorials' settings."""
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "modeldiff tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch_module.setenv("JUPYTER_PATH", str(spec_dir.parent.parent))
    monkeypatch_module.setenv("MODELDIFF_TUTORIAL_SIZE", "tiny")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("OMP_NUM_THREADS", "2")
    monkeypatch_module.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def organism_cached():
    """Make sure the tiny organism is in the cache before the notebooks ask for it."""
    from modeldiff.organisms import OrganismRecipe, build_persona_organism

    build_persona_organism(OrganismRecipe.tiny(), progress=False)


def execute(path: Path) -> object:
    """Run the tutorial as a notebook, plus one last cell that prints the kernel's interpreter."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    return nb


def test_every_tutorial_is_a_percent_notebook():
    assert [p.name for p in TUTORIALS], "no tutorials found"
    for p in TUTORIALS:
        assert p.read_text(encoding="utf-8").startswith("# %%"), f"{p.name}: not percent format"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_as_a_notebook(path, kernel_env, organism_cached):
    t0 = time.perf_counter()
    nb = execute(path)  # a failing cell (an assert of the tutorial's result) raises here
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    # the kernel was this interpreter, so the notebook ran the code installed here
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
