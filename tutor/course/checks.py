"""What every exercise check is made of: a verdict, a hint, the registry, answer helpers.

A check is a function ``fn(answer) -> Verdict`` registered under an id "NN.k" (notebook NN,
exercise k) with `@exercise`. It returns `right(why)` or `wrong(hint)`, or raises `Hint` when
the answer cannot be right (a wrong type); `judge` and `choice` match typical mistakes to
their own hints. The exercises themselves live in `tutor.course.exercises_basics` (00-03),
`exercises_models` (04-08) and `exercises_scale` (09); `tutor.course.lab` runs them.

Not handled: scores or partial credit; answers given as strings of numbers ("12") are not
converted (the hint says which type is expected).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tutor.errors import TutorError
from tutor.models import load, resolve


@dataclass(frozen=True)
class Verdict:
    """What a check decided: right or not, and the short why (right) or the hint (wrong)."""

    right: bool
    message: str


def right(why: str) -> Verdict:
    return Verdict(True, why)


def wrong(hint: str) -> Verdict:
    return Verdict(False, hint)


class Hint(Exception):
    """Raised inside a check when the answer cannot be right (e.g. wrong type); the message
    is the hint shown to the student."""


@dataclass(frozen=True)
class Exercise:
    id: str  # "NN.k": notebook NN, exercise k
    title: str
    check: Callable[[Any], Verdict]
    given: Any = None  # the exercise's input; `given(id)` hands out deep copies


EXERCISES: dict[str, Exercise] = {}


def exercise(exercise_id: str, title: str, given: Any = None):
    """Decorator: register `fn(answer) -> Verdict` as the check of `exercise_id`."""
    if not re.fullmatch(r"\d\d\.\d+", exercise_id):
        raise TutorError(f"exercise id '{exercise_id}' must look like '02.1' (notebook.number)")

    def register(fn: Callable[[Any], Verdict]) -> Callable[[Any], Verdict]:
        if exercise_id in EXERCISES:
            raise TutorError(f"exercise '{exercise_id}' is registered twice")
        EXERCISES[exercise_id] = Exercise(exercise_id, title, fn, given)
        return fn

    return register



def _scalar(answer: Any) -> Any:
    """A 0-d tensor / numpy number becomes a Python number; anything else is returned as is."""
    if hasattr(answer, "item") and getattr(answer, "ndim", 1) == 0:
        return answer.item()
    return answer


def as_int(answer: Any, what: str = "a whole number") -> int:
    value = _scalar(answer)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Hint(f"the answer should be {what} (an int), not {type(answer).__name__} "
                   f"{answer!r:.40}")
    return value


def as_float(answer: Any, what: str = "a number") -> float:
    value = _scalar(answer)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Hint(f"the answer should be {what}, not {type(answer).__name__} {answer!r:.40}")
    return float(value)


def as_str(answer: Any, what: str = "a string") -> str:
    if not isinstance(answer, str):
        raise Hint(f"the answer should be {what} (a str), not {type(answer).__name__}")
    return answer


def judge(answer: float, expected: float, why: str, hint: str,
          mistakes: Iterable[tuple[float, str]] = (), rel: float = 0.0) -> Verdict:
    """Right when `answer` equals `expected` (within `rel`, relative); otherwise the hint of
    the first typical mistake it equals, else the general `hint`."""
    def near(a: float, b: float) -> bool:
        return abs(a - b) <= rel * abs(b) if rel else a == b

    if near(answer, expected):
        return right(why)
    return next((wrong(text) for value, text in mistakes if near(answer, value)), wrong(hint))


def not_a_change(overrides: Any, example: str, same_run: Callable[[list[str]], bool],
                 ) -> Verdict | None:
    """The hint for an experiment's list of recipe overrides that changes nothing (not a
    non-empty list of "key=value" strings, or `same_run(overrides)`: the shipped run's cache
    key); None when it is a change. `example` is one override to show."""
    if not (isinstance(overrides, list) and overrides and all(isinstance(o, str) and "=" in o
                                                               for o in overrides)):
        return wrong(f"the first item is the list of overrides you changed, e.g. ['{example}']: "
                     "one change at least, or there is nothing to compare")
    if same_run(overrides):
        return wrong(f"{overrides} trains the same weights as the shipped recipe (same cache "
                     "key): change a value, not just restate it")
    return None


def choice(answer: Any, correct: str, why: str, hints: dict[str, str]) -> Verdict:
    """A multiple-choice answer: one letter; each wrong letter has its own hint."""
    letter = as_str(answer, "one letter").strip().strip("()").lower()
    if letter != correct and letter not in hints:
        raise Hint(f"answer with one of the letters {', '.join(sorted([correct, *hints]))}")
    return right(why) if letter == correct else wrong(hints[letter])


@functools.cache
def bundled_tokenizer() -> Any:
    """The bundled model's tokenizer (no weights), loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve())


@functools.cache
def bundled_model(bits: int | None = None) -> Any:
    """The bundled model (fp32, or NF4 with `bits=4`), loaded once per process, for checks
    that must run it; callers must not change it (it is shared)."""
    return load(bits=bits)[0]
