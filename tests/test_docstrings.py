"""Every public function and class shows how it is used: an ``Example:`` section whose ``>>>``
lines are collected as a doctest, and the test command runs the doctests under src/.

Public means: named in ``modeldiff.__all__`` or in the ``__all__`` of a public module (one whose
name does not start with ``_``; the modules docs/reference/ documents).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "modeldiff"

# name -> why it has no example of its own
EXEMPT: dict[str, str] = {}

# Exception classes need no example of their own: raising them is the whole API, and
# docs/errors.md shows the family and what each one means.
EXEMPT_EXCEPTIONS = True

# Modules other engineers are writing at the time of this test; their examples are reported by
# test_modules_in_progress_have_examples (an expected failure that names what is missing) until
# they are done, instead of failing everyone's run or being skipped silently.
IN_PROGRESS: set[str] = set()


def _public_modules() -> list[str]:
    names = [p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("_")]
    names += [p.parent.name for p in PACKAGE.glob("*/__init__.py")]
    return ["modeldiff", *sorted(f"modeldiff.{n}" for n in names)]


def _public_objects(modules: list[str]) -> dict[str, object]:
    """``module.name`` -> object, for every function and class in a public ``__all__``, named
    by the module that defines it (where its doctest is collected)."""
    out: dict[str, object] = {}
    for name in modules:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            home = getattr(obj, "__module__", "") or ""
            if not home.startswith("modeldiff"):
                continue
            out[f"{home}.{obj.__qualname__}"] = obj
    return out


def _collected(module_names: set[str]) -> set[str]:
    """Names of the doctests pytest's --doctest-modules collects from these modules."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    found: set[str] = set()
    for name in module_names:
        mod = sys.modules.get(name) or importlib.import_module(name)
        found |= {t.name for t in finder.find(mod) if t.examples}
    return found


def _missing(
    modules: list[str], *, skip: frozenset[str] | set[str] = frozenset(), in_progress: bool = False
) -> list[str]:
    objects = _public_objects(modules)
    collected = _collected({key.rsplit(".", 1)[0] for key in objects} | set(modules))
    missing = []
    for key, obj in sorted(objects.items()):
        if key in EXEMPT or obj.__qualname__ in EXEMPT or key in skip:
            continue
        if EXEMPT_EXCEPTIONS and inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        if key.rsplit(".", 1)[0] in IN_PROGRESS and not in_progress:
            continue
        doc = inspect.getdoc(obj) or ""
        if "Example" not in doc or ">>>" not in doc:
            missing.append(f"{key}: no 'Example:' section with a >>> line")
        elif key not in collected:
            missing.append(f"{key}: its example is not collected as a doctest")
    return missing


def test_every_public_function_and_class_has_a_runnable_example():
    modules = [m for m in _public_modules() if m not in IN_PROGRESS]
    assert _missing(modules) == []


def test_exemptions_are_justified_and_still_needed():
    objects = _public_objects(_public_modules())
    for name, why in EXEMPT.items():
        assert len(why) > 20, name
        assert any(k == name or k.endswith("." + name) for k in objects), f"{name} is not public"


def test_the_test_command_runs_the_doctests_under_src():
    # (tomllib is 3.11+; the section is two plain lines)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    addopts = re.search(r'^addopts\s*=\s*"([^"]*)"', section, re.M)
    testpaths = re.search(r"^testpaths\s*=\s*\[([^\]]*)\]", section, re.M)
    assert addopts and "--doctest-modules" in addopts.group(1).split()
    assert testpaths and '"src/modeldiff"' in testpaths.group(1)
