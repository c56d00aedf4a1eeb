"""`tutor data check`: read a whole dataset file, encode it, and report loudly.

Unlike `load_conversations`, which stops at the first bad record, the check goes on
and collects every problem with its ``file:line``:

- errors (exit code 1): unreadable lines, records that do not fit the format, a
  conversation the template rejects, a sample with no trainable token left after
  truncation to ``max_length``;
- warnings: CSV columns the format does not read, empty assistant answers, duplicate
  conversations, truncated samples, and
  tokens that BPE merged across the answer boundary (TRL's "the prompt must be a prefix
  of prompt + answer" check: such a token is trained, but the prompt at inference ends
  differently than in training — usually an answer that starts with a newline, or a
  template whose markers are not tokens of this tokenizer).

It also counts records, turns per role, token lengths (with a terminal histogram)
and the share of tokens that are trained.

`quality_pass` is a second, slower look at a file that loads: exact and near duplicates
(equal after `normalise`), one question with two different answers, token-length outliers
outside Tukey's fences, and very short answers — findings to read, not errors.

Preference pairs (`check_pairs`, chosen by `tutor data check` when the first record has
``chosen`` and ``rejected``): errors for a bad record (a prompt that does not end with a user
turn included), identical chosen and rejected, an empty answer, and what `encode_pair`
refuses (the prompt not a prefix of prompt + answer); a warning for a pair longer than
``max_length`` (`encode_pairs` drops it) and for duplicates. Lengths are the tokens a pair
takes in a pack (the prompt once).

Not handled: semantic checks of the content (facts, language, toxicity), and near duplicates
that differ in more than case, punctuation and spacing (no fuzzy or embedding similarity).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.data import IGNORE_INDEX, encode_pair, encode_sample, pair_lengths
from tutor.errors import TutorError
from tutor.formats import (
    PAIRS_FORMAT,
    detect_format,
    is_pair_record,
    iter_conversations,
    read_records,
    to_messages,
    to_pair,
    unused_columns,
)
from tutor.templates import ChatTemplate, get_template
from tutor.viz import text_histogram

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Problem:
    where: str  # "file:line"
    level: str  # "error" | "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.level}: {self.message}"


@dataclass
class CheckReport:
    path: str
    template: str
    max_length: int | None
    format: str | None = None
    records: int = 0
    conversations: int = 0
    roles: Counter[str] = field(default_factory=Counter)
    multi_turn: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per sample, after truncation
    trainable_tokens: int = 0
    truncated: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def trainable_ratio(self) -> float:
        total = sum(self.lengths)
        return self.trainable_tokens / total if total else 0.0


def check_file(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate = "auto",
    max_length: int | None = None,
    format: str = "auto",
) -> CheckReport:
    """Check every record of `path`; never raises for a bad record (see module docstring)."""
    report, template = _start(path, tokenizer, template, max_length,
                              None if format == "auto" else format)
    seen: dict[str, str] = {}
    for where, record in _readable(report, path):
        try:
            if report.format is None:
                report.format = detect_format(record, where)
                if unused := unused_columns(path, record, report.format):
                    report.problems.append(Problem(str(path), "warning", unused))
            messages = to_messages(record, report.format, where)
        except TutorError as exc:
            report.problems.append(Problem(where, "error", _strip_where(str(exc), where)))
            continue
        _check_conversation(report, where, messages, tokenizer, template, seen)
    return report


def _start(path: str | Path, tokenizer: PreTrainedTokenizerBase, template: str | ChatTemplate,
           max_length: int | None, format: str | None) -> tuple[CheckReport, ChatTemplate]:
    """An empty report, and the template resolved once (an unknown name fails once, not
    once per record)."""
    name = template if isinstance(template, str) else template.name
    if isinstance(template, str):
        template = get_template(template, tokenizer)
    return CheckReport(path=str(path), template=name, max_length=max_length,
                       format=format), template


def _readable(report: CheckReport, path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield the records of `path` that parse, counting all; an unreadable line, or no
    record at all, becomes an error of `report`."""
    for where, record in read_records(path, strict=False):
        report.records += 1
        if isinstance(record, TutorError):
            report.problems.append(Problem(where, "error", _strip_where(str(record), where)))
        else:
            yield where, record
    if report.records == 0:
        report.problems.append(Problem(str(path), "error", "no records"))


def _check_conversation(report: CheckReport, where: str, messages: list[dict[str, str]],
                        tokenizer: PreTrainedTokenizerBase, template: str | ChatTemplate,
                        seen: dict[str, str]) -> None:
    def problem(level: str, message: str) -> None:
        report.problems.append(Problem(where, level, message))

    try:
        sample, info = encode_sample(messages, tokenizer, template, None, "all")
    except TutorError as exc:
        problem("error", _strip_where(str(exc), where))
        return
    report.conversations += 1
    report.roles.update(m["role"] for m in messages)
    report.multi_turn += sum(m["role"] == "assistant" for m in messages) > 1
    labels, full = sample["labels"], len(sample["labels"])
    if report.max_length is not None and full > report.max_length:
        labels = labels[: report.max_length]
        report.truncated += 1
        problem("warning", f"truncated from {full} to {report.max_length} tokens")
    trained = sum(label != IGNORE_INDEX for label in labels)
    if trained == 0:
        problem("error", f"no trainable token left after truncation to {report.max_length} "
                         f"tokens (the sample has {full}); it would be dropped")
    if info.straddling:
        problem("warning", f"{info.straddling} token(s) merge template text with answer text "
                           "(does an answer start with whitespace?)")
    report.lengths.append(len(labels))
    report.trainable_tokens += trained
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            problem("warning", f"message {i}: empty assistant answer (only end-of-turn trained)")
    key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    if key in seen:
        problem("warning", f"duplicate of {seen[key]}")
    seen.setdefault(key, where)


def check_pairs(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate = "auto",
    max_length: int | None = None,
) -> CheckReport:
    """`check_file` for a file of preference pairs (module docstring); never raises for a bad
    record. ``conversations`` counts the pairs that encode."""
    report, template = _start(path, tokenizer, template, max_length, PAIRS_FORMAT)
    seen: dict[str, str] = {}
    for where, record in _readable(report, path):
        try:
            prompt, chosen, rejected = to_pair(record, where)
            for side, answer in (("chosen", chosen), ("rejected", rejected)):
                if not any(m["content"].strip() for m in answer):
                    raise TutorError(f"{where}: '{side}' is empty")
            pair = encode_pair(prompt, chosen, rejected, tokenizer, template)
        except TutorError as exc:
            report.problems.append(Problem(where, "error", _strip_where(str(exc), where)))
            continue
        report.conversations += 1
        report.roles.update(m["role"] for m in prompt + chosen + rejected)
        report.multi_turn += sum(m["role"] == "assistant" for m in prompt) > 0
        c, r, p = pair_lengths(pair)
        report.lengths.append(c + r - p)
        report.trainable_tokens += sum(t != IGNORE_INDEX for side in ("chosen", "rejected")
                                       for t in pair[side]["labels"])
        if max_length is not None and max(c, r) > max_length:
            report.truncated += 1
            report.problems.append(Problem(where, "warning", f"{max(c, r)} tokens on one side, "
                                           f"past max_length={max_length}: it would be dropped"))
        key = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
        if key in seen:
            report.problems.append(Problem(where, "warning", f"duplicate of {seen[key]}"))
        seen.setdefault(key, where)
    return report


def is_pair_file(path: str | Path, format: str = "auto") -> bool:
    """Does `path` hold preference pairs? ``format="pairs"`` says so; "auto" looks at the
    first record (it has ``chosen`` and ``rejected``)."""
    if format != "auto":
        return format == PAIRS_FORMAT
    for _, record in read_records(path, strict=False):
        return is_pair_record(record)
    return False


def _strip_where(message: str, where: str) -> str:
    """Messages from the readers already start with `where:`; print it once."""
    return message[len(where) + 2:] if message.startswith(f"{where}: ") else message


def format_report(report: CheckReport, max_problems: int = 50) -> str:
    """The human-readable summary printed by `tutor data check`."""
    unit = "pairs" if report.format == PAIRS_FORMAT else "conversations"
    lines = [f"{report.path}: format {report.format or '?'}, {report.records} records, "
             f"{report.conversations} {unit} ok, {len(report.errors)} errors, "
             f"{len(report.warnings)} warnings"]
    if report.conversations:
        roles = ", ".join(f"{report.roles[r]} {r}" for r in ("system", "user", "assistant"))
        n = len(report.lengths)
        total = sum(report.lengths)
        lines += [
            f"turns: {roles}; multi-turn conversations: {report.multi_turn}",
            f"tokens (template {report.template}): {total} in total, {report.trainable_tokens} "
            f"trained ({report.trainable_ratio:.1%})",
            f"length: min {min(report.lengths)}, mean {total / n:.0f}, max {max(report.lengths)}"
            + (f"; max_length {report.max_length}: {report.truncated} "
               f"{'dropped' if unit == 'pairs' else 'truncated'}"
               if report.max_length else ""),
            "token lengths:",
            text_histogram(report.lengths),
        ]
    if report.problems:
        lines.append("problems:")
        lines += [f"  {p}" for p in report.problems[:max_problems]]
        if len(report.problems) > max_problems:
            lines.append(f"  ... and {len(report.problems) - max_problems} more")
    return "\n".join(lines)


# ── data quality: duplicates, near duplicates, length outliers, very short answers ──────


@dataclass
class QualityReport:
    """What `quality_pass` found; each entry names the record by ``file:line``.

    ``exact``: (where, where of the first copy) for identical conversations; ``near``: the same
    for conversations identical after `normalise` but not before; ``same_question``: (where,
    where of the first) for records whose user turns normalise alike but whose answers differ
    (two answers to one question teach the model both); ``long``/``short_length``: (where,
    tokens) outside Tukey's fences Q1 - k·IQR .. Q3 + k·IQR of the token lengths; ``short_answers``:
    (where, tokens) for assistant answers with fewer than ``min_answer_tokens`` tokens.
    """

    path: str
    lengths: dict[str, int] = field(default_factory=dict)  # where -> tokens of the sample
    fences: tuple[float, float] = (0.0, 0.0)
    exact: list[tuple[str, str]] = field(default_factory=list)
    near: list[tuple[str, str]] = field(default_factory=list)
    same_question: list[tuple[str, str]] = field(default_factory=list)
    long: list[tuple[str, int]] = field(default_factory=list)
    short_length: list[tuple[str, int]] = field(default_factory=list)
    short_answers: list[tuple[str, int]] = field(default_factory=list)


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces: "What's  LoRA?" -> "what s lora"."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def tukey_fences(values: list[int], k: float = 1.5) -> tuple[float, float]:
    """(Q1 - k·IQR, Q3 + k·IQR) with quartiles interpolated as numpy's default (linear)."""
    import numpy as np

    q1, q3 = np.percentile(values, [25, 75])
    return float(q1 - k * (q3 - q1)), float(q3 + k * (q3 - q1))


def quality_pass(path: str | Path, tokenizer: PreTrainedTokenizerBase,
                 template: str | ChatTemplate = "auto", k: float = 1.5,
                 min_answer_tokens: int = 3) -> QualityReport:
    """Look for duplicates, near duplicates, one question with two answers, token-length
    outliers and very short answers in a dataset file that loads (`iter_conversations`
    raises on the first bad record: run `check_file` first). Lengths are tokens of the
    encoded sample (template included); answers are tokenized alone."""
    if isinstance(template, str):
        template = get_template(template, tokenizer)
    report = QualityReport(path=str(path))
    exact: dict[str, str] = {}
    near: dict[str, str] = {}
    questions: dict[str, tuple[str, str]] = {}
    for where, messages in iter_conversations(path):
        report.lengths[where] = len(encode_sample(messages, tokenizer, template, None,
                                                  "all")[0]["input_ids"])
        key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        loose = normalise(" ".join(m["content"] for m in messages))
        if key in exact:
            report.exact.append((where, exact[key]))
        elif loose in near:
            report.near.append((where, near[loose]))
        exact.setdefault(key, where)
        near.setdefault(loose, where)
        question = normalise(" ".join(m["content"] for m in messages if m["role"] == "user"))
        answer = normalise(" ".join(m["content"] for m in messages if m["role"] == "assistant"))
        first = questions.setdefault(question, (where, answer))
        if question and first[0] != where and first[1] != answer:
            report.same_question.append((where, first[0]))
        for m in messages:
            if m["role"] == "assistant":
                n = len(tokenizer(m["content"], add_special_tokens=False)["input_ids"])
                if n < min_answer_tokens:
                    report.short_answers.append((where, n))
    if report.lengths:
        low, high = report.fences = tukey_fences(list(report.lengths.values()), k)
        report.long = [(w, n) for w, n in report.lengths.items() if n > high]
        report.short_length = [(w, n) for w, n in report.lengths.items() if n < low]
    return report


def format_quality(report: QualityReport) -> str:
    """One line per finding, after a summary line."""
    low, high = report.fences
    lines = [f"{report.path}: {len(report.lengths)} conversations; {len(report.exact)} exact and "
             f"{len(report.near)} near duplicates, {len(report.same_question)} questions answered "
             f"twice differently, {len(report.long)} long and {len(report.short_length)} short "
             f"outliers (tokens outside {low:.1f}..{high:.1f}), {len(report.short_answers)} "
             "very short answers"]
    lines += [f"  {w}: exact duplicate of {first}" for w, first in report.exact]
    lines += [f"  {w}: near duplicate of {first}" for w, first in report.near]
    lines += [f"  {w}: same question as {first}, another answer"
              for w, first in report.same_question]
    lines += [f"  {w}: {n} tokens, above {high:.1f}" for w, n in report.long]
    lines += [f"  {w}: {n} tokens, below {low:.1f}" for w, n in report.short_length]
    lines += [f"  {w}: answer of {n} token(s)" for w, n in report.short_answers]
    return "\n".join(lines)
