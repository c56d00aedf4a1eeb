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

Not handled: semantic checks of the content (facts, language, toxicity).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tutor.data import IGNORE_INDEX, encode_sample
from tutor.errors import TutorError
from tutor.formats import detect_format, read_records, to_messages, unused_columns
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
    name = template if isinstance(template, str) else template.name
    if isinstance(template, str):  # an unknown name fails once, not once per record
        template = get_template(template, tokenizer)
    report = CheckReport(path=str(path), template=name, max_length=max_length,
                         format=None if format == "auto" else format)
    seen: dict[str, str] = {}
    for where, record in read_records(path, strict=False):
        report.records += 1
        try:
            if isinstance(record, TutorError):
                raise record
            if report.format is None:
                report.format = detect_format(record, where)
                if unused := unused_columns(path, record, report.format):
                    report.problems.append(Problem(str(path), "warning", unused))
            messages = to_messages(record, report.format, where)
        except TutorError as exc:
            report.problems.append(Problem(where, "error", _strip_where(str(exc), where)))
            continue
        _check_conversation(report, where, messages, tokenizer, template, seen)
    if report.records == 0:
        report.problems.append(Problem(str(path), "error", "no records"))
    return report


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


def _strip_where(message: str, where: str) -> str:
    """Messages from the readers already start with `where:`; print it once."""
    return message[len(where) + 2:] if message.startswith(f"{where}: ") else message


def format_report(report: CheckReport, max_problems: int = 50) -> str:
    """The human-readable summary printed by `tutor data check`."""
    lines = [f"{report.path}: format {report.format or '?'}, {report.records} records, "
             f"{report.conversations} conversations ok, {len(report.errors)} errors, "
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
            + (f"; max_length {report.max_length}: {report.truncated} truncated"
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
