"""Notebook hygiene: committed notebooks are clean, executed in order, and do not drift.

nbval re-executes the notebooks; this file checks what is *committed*, which is what a
reader sees on a code host: outputs present and in order, no widget state, no errors,
no oversized outputs, and no production logic defined only in a notebook.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[2] / "nbs"
NOTEBOOKS = sorted(NBS.glob("**/*.ipynb"))
MAX_OUTPUT_BYTES = 300_000  # one figure at 100 dpi is ~30–80 kB; anything larger is noise
MAX_NOTEBOOK_BYTES = 2_000_000


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _python_source(cell: dict) -> str:
    # IPython magics and shell escapes are not Python; blank them before parsing.
    lines = "".join(cell["source"]).splitlines()
    return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in lines)


@pytest.fixture(params=NOTEBOOKS, ids=[str(p.relative_to(NBS)) for p in NOTEBOOKS])
def notebook(request) -> tuple[Path, dict]:
    path: Path = request.param
    return path, json.loads(path.read_text(encoding="utf-8"))


def test_there_are_notebooks():
    assert (NBS / "00_quickstart.ipynb") in NOTEBOOKS


def test_no_widget_state(notebook):
    path, nb = notebook
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: strip widget state"


def test_no_error_outputs(notebook):
    path, nb = notebook
    for i, cell in enumerate(_code_cells(nb)):
        kinds = [o["output_type"] for o in cell.get("outputs", [])]
        assert "error" not in kinds, f"{path.name}: code cell {i} has an error output"


def test_executed_in_order(notebook):
    path, nb = notebook
    counts = [c.get("execution_count") for c in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts}; re-run it top to bottom with "
        f"`python tools/run_notebooks.py {path.relative_to(NBS.parent)}`"
    )


def test_outputs_are_small(notebook):
    path, nb = notebook
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, f"{path.name} is too large"
    for i, cell in enumerate(_code_cells(nb)):
        for out in cell.get("outputs", []):
            size = len(json.dumps(out))
            assert size <= MAX_OUTPUT_BYTES, f"{path.name}: cell {i} output is {size} bytes"


def test_no_functions_or_classes_defined(notebook):
    """Logic lives in `tutor/`; a notebook that defines functions has drifted from the package."""
    path, nb = notebook
    for i, cell in enumerate(_code_cells(nb)):
        tree = ast.parse(_python_source(cell))
        defined = [n.name for n in ast.walk(tree)
                   if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        assert not defined, f"{path.name}: cell {i} defines {defined}; move them into tutor/"


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_ends_with_checks(notebook):
    """The lesson ends with its own asserting checks. Only exercises may follow them: a
    "## Exercises" markdown cell, the answer cells, and one last cell that calls lab.check and
    never asserts (the committed state is unsolved). A solution notebook's last cell asserts
    its checks."""
    path, nb = notebook
    cells = nb["cells"]
    last = _source(_code_cells(nb)[-1])
    if path.parent.name == "solutions":
        assert "assert lab.check(" in last, f"{path.name}: assert every lab.check at the end"
        return
    if "lab.check(" not in last:
        assert "assert" in last, f"{path.name}: the last code cell should assert the lesson"
        return
    start = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                  and _source(c).startswith("## Exercises")), None)
    assert start is not None, f"{path.name}: put a '## Exercises' markdown cell before them"
    lesson, exercises = cells[:start], [c for c in cells[start:] if c["cell_type"] == "code"]
    lesson_code = [c for c in lesson if c["cell_type"] == "code"]
    assert lesson_code and "assert" in _source(lesson_code[-1]), (
        f"{path.name}: the last code cell before the exercises should assert the lesson")
    assert not any("assert" in _source(c) for c in exercises), (
        f"{path.name}: exercise cells must not assert (unsolved, they run in CI)")


def _markdown(nb: dict) -> str:
    return "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")


def _pinned() -> dict[str, str]:
    """Dependency name -> its version specifier in pyproject.toml (e.g. '>=5.23,<6'), from
    every quoted requirement of [project] (dependencies and extras)."""
    text = (NBS.parent / "pyproject.toml").read_text(encoding="utf-8")
    return {m.group(1).lower(): m.group(2)
            for m in re.finditer(r'^\s*"([A-Za-z][\w.-]*)((?:[<>=!~]=?[\w.*]+,?)+)"', text, re.M)}


def test_prose_names_only_versions_the_setup_admits(notebook):
    """'transformers 5.23' in prose must be a version pyproject.toml admits: a lesson cannot
    describe a library the setup never installs."""
    from packaging.specifiers import SpecifierSet

    path, nb = notebook
    pinned = _pinned()
    assert {"torch", "transformers", "peft", "deepspeed"} <= set(pinned)
    names = "|".join(re.escape(name) for name in sorted(pinned, key=len, reverse=True))
    for m in re.finditer(rf"(?i)\b({names})\s+v?(\d+\.\d+(?:\.\d+)?)\b", _markdown(nb)):
        name, version = m.group(1).lower(), m.group(2)
        assert version in SpecifierSet(pinned[name]), (
            f"{path.name}: the prose names {name} {version}, pyproject.toml pins "
            f"{name}{pinned[name]}")


def test_prose_cites_only_files_in_the_repository(notebook):
    """A file the prose sends the reader to must exist: a path (`tests/test_zero.py`) from the
    repository root, the notebook's folder or tutor/configs/ (where a recipe's `data/x.jsonl`
    lives), a bare notes file (`DESIGN.md`) anywhere in the repository.
    (Bare .py names are left alone: the prose also names upstream files, e.g. XTuner configs.)"""
    path, nb = notebook
    root = NBS.parent
    for m in re.finditer(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.(?:md|py|ipynb|json|jsonl|yaml))\b",
                         _markdown(nb)):
        cited = m.group(1)
        if "/" in cited:
            found = any((base / cited).exists()
                        for base in (root, path.parent, root / "tutor" / "configs"))
        elif cited.endswith((".md", ".ipynb")):
            found = any(root.glob(f"**/{cited}"))
        else:
            continue
        assert found, f"{path.name}: the prose cites {cited}, which is not in the repository"
