"""Exercises: check a student's answer, say whether it is right, and if not, give a hint.

In a notebook::

    from tutor.course import lab
    chat = lab.given("02.1")        # the exercise's input, when it has one (a fresh copy)
    answer_1 = ...                  # the student replaces the `...`
    lab.check("02.1", answer_1)     # prints one line, returns True or False

    ✓ 02.1 right — both answers and their <|im_end|> tokens: 12 of 56 tokens
    ✗ 02.1 not yet — hint: you counted every token; only labels != -100 are trained
    … 02.1 not answered yet — replace the `...`

Each exercise is a small function in a registry (`EXERCISES`, keyed by id "NN.k": notebook
NN, exercise k). It computes the expected answer when it runs — from the package, the bundled
model or the course data, never a pasted number — so a check breaks loudly when the lesson and
the code drift apart; nbs/solutions/ holds one notebook per lesson that asserts every check on a
right answer, and nbval runs them.

Collecting results: when the environment variable TUTOR_LAB_REPORT names a file, every check
appends one JSON line ``{"id", "status", "message"}`` to it. `check_notebook` (the command
`tutor lab check NB`) runs a copy of a student's notebook that way and returns the results.

Adding an exercise (for example to notebook 09):

1. Write a function that takes the answer and returns ``right("why")`` or
   ``wrong("a specific hint")``, decorated with ``@exercise("09.1", "one-line title",
   given=optional_input)``, in tutor/course/exercises_models.py (notebooks 04-08; 00-03 are
   in exercises_basics.py, 09 in exercises_scale.py). Compute the expected
   value inside it; the helpers of tutor.course.checks (`as_int`, `as_float`, `as_str`, `judge`,
   `choice`) turn a wrongly typed answer into a hint and match typical mistakes to their own hints.
2. In the notebook, after its own checks cell: a markdown cell "## Exercises" explaining each,
   a code cell per exercise ending in ``answer_1 = ...``, and one last code cell that calls
   ``lab.check("09.1", answer_1)`` for each exercise (unsolved, it prints and never raises).
3. Add nbs/solutions/09_<name>.ipynb: only the setup the exercises need, the solved cells and a
   last cell ``assert lab.check("09.1", answer_1)``; execute both with tools/run_notebooks.py.
4. Add a right and a typical wrong answer to the table in tests/course/test_lab.py.

Not handled: scores or partial credit, time limits on a single check, and exercises whose
answer cannot be compared with a value (a plot); a check says which type it expects.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor.course import (  # noqa: F401
    exercises_basics,
    exercises_models,
    exercises_preference,
    exercises_scale,
)
from tutor.course.checks import EXERCISES, Exercise, Hint, wrong
from tutor.errors import TutorError

REPORT_ENV = "TUTOR_LAB_REPORT"
RIGHT, WRONG, UNANSWERED, UNCHECKED = "right", "wrong", "unanswered", "unchecked"
STATUS_TEXT = {RIGHT: "right", WRONG: "not yet", UNANSWERED: "not answered",
               UNCHECKED: "not checked"}
_NOT_ANSWERED = "replace the `...` with your answer"


def exercises() -> dict[str, Exercise]:
    """Every registered exercise, by id (importing the exercise modules above registered them)."""
    return EXERCISES


def get(exercise_id: str) -> Exercise:
    known = exercises()
    if exercise_id not in known:
        same = [k for k in known if k.split(".")[0] == exercise_id.split(".")[0]]
        raise TutorError(f"unknown exercise '{exercise_id}'; known: {', '.join(same or known)}")
    return known[exercise_id]


def given(exercise_id: str) -> Any:
    """A fresh copy of the input of `exercise_id` (changing it cannot change the check)."""
    return copy.deepcopy(get(exercise_id).given)


def check(exercise_id: str, answer: Any) -> bool:
    """Check `answer`, print one line (right / not yet + hint / not answered), return right."""
    ex = get(exercise_id)
    if answer is Ellipsis:
        status, message = UNANSWERED, _NOT_ANSWERED
        print(f"… {exercise_id} not answered yet — replace the `...`")
    else:
        try:
            verdict = ex.check(answer)
        except Hint as hint:
            verdict = wrong(str(hint))
        status, message = (RIGHT if verdict.right else WRONG), verdict.message
        if verdict.right:
            print(f"✓ {exercise_id} right — {message}")
        else:
            print(f"✗ {exercise_id} not yet — hint: {message}")
    _record(exercise_id, status, message)
    return status == RIGHT


def _record(exercise_id: str, status: str, message: str) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:  # one line per check, appended: a runner reads them after the notebook ran
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": exercise_id, "status": status, "message": message},
                               ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Result:
    id: str
    status: str  # RIGHT, WRONG, UNANSWERED or UNCHECKED
    message: str


def check_notebook(path: str | os.PathLike[str], timeout: int = 600) -> list[Result]:
    """Run a copy of the notebook at `path` and return its exercise results, in id order.

    The notebook is read into memory and executed there (the file is never written) by a
    fresh python3 kernel whose working directory is the notebook's own, so relative paths
    work; TUTOR_LAB_REPORT points at a temporary file. `timeout` is per cell, in seconds.
    Exercises of the notebook (its "NN_" file prefix, or the ids it checked) that it never
    checked come back as UNCHECKED. A cell that raises, times out or kills the kernel is a
    TutorError naming the cell.
    """
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    except ImportError as exc:
        raise TutorError(f"tutor lab check needs nbclient and ipykernel ({exc}): "
                         "pip install nbclient ipykernel") from exc
    nb_path = Path(path)
    if not nb_path.is_file():
        raise TutorError(f"{nb_path}: no such notebook")
    try:
        nb = nbformat.read(nb_path, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for a bad file
        raise TutorError(f"{nb_path}: not a readable notebook ({exc})") from exc
    current: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tutor-lab-") as tmp:
        report = Path(tmp) / "report.jsonl"
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3",
            resources={"metadata": {"path": str(nb_path.resolve().parent)}},
            on_cell_start=lambda cell, cell_index: current.update(index=cell_index))
        try:
            client.execute(env={**os.environ, REPORT_ENV: str(report)})
        except CellTimeoutError:
            what = f"timed out after {timeout} s (raise --timeout?)"
        except CellExecutionError as exc:
            what = f"raised {exc.ename}: {(str(exc.evalue).strip().splitlines() or [''])[0]}"
        except DeadKernelError:
            what = "stopped the kernel (out of memory?)"
        else:
            what = ""
        lines = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
    if what:
        raise TutorError(f"{nb_path}: {_failed_cell(nb, current.get('index'), what)}")
    return _results([json.loads(line) for line in lines], nb_path.name)


def _failed_cell(nb: Any, index: int | None, what: str) -> str:
    """'cell 7 (`x = 1 / 0`) raised ZeroDivisionError: division by zero' — one line."""
    if index is None:
        return f"the kernel {what}"
    lines = [ln for ln in nb.cells[index].source.splitlines() if ln.strip()]
    first = lines[0][:60] if lines else ""
    if len(lines) > 1 or (lines and len(lines[0]) > 60):
        first += " …"  # the cell goes on
    return f"cell {index + 1} (`{first}`) {what}"


def _results(records: list[dict[str, str]], filename: str) -> list[Result]:
    """Last report per id (a cell run twice reports twice), plus UNCHECKED exercises."""
    latest = {r["id"]: Result(r["id"], r["status"], r["message"]) for r in records}
    prefix = re.match(r"(\d\d)_", filename)
    notebooks = {i.split(".")[0] for i in latest} | ({prefix.group(1)} if prefix else set())
    for ex in exercises().values():
        if ex.id.split(".")[0] in notebooks and ex.id not in latest:
            latest[ex.id] = Result(ex.id, UNCHECKED, "the notebook never called lab.check for it")
    return sorted(latest.values(), key=lambda r: _order(r.id))


def _order(exercise_id: str) -> tuple[int, int]:
    nb, k = exercise_id.split(".")
    return int(nb), int(k)


def all_right(results: list[Result]) -> bool:
    return bool(results) and all(r.status == RIGHT for r in results)


def format_results(results: list[Result]) -> str:
    """A table: exercise, status, and the why (right) or the hint (otherwise)."""
    if not results:
        return "no exercise was checked: the notebook never called lab.check"
    rows = [f"{'exercise':<9} {'status':<13} hint"]
    rows += [f"{r.id:<9} {STATUS_TEXT.get(r.status, r.status):<13} "
             f"{'' if r.status == RIGHT else r.message}" for r in results]
    n_right = sum(r.status == RIGHT for r in results)
    rows.append(f"{n_right} of {len(results)} right")
    return "\n".join(row.rstrip() for row in rows)


def format_list() -> str:
    """Every exercise, grouped by notebook: id and title."""
    rows, last = [], None
    for ex in sorted(exercises().values(), key=lambda e: _order(e.id)):
        nb = ex.id.split(".")[0]
        if nb != last:
            rows.append(f"notebook {nb}")
            last = nb
        rows.append(f"  {ex.id:<6} {ex.title}")
    return "\n".join(rows)
