"""Did fine-tuning help? Score a model's greedy answers and answer loss on held-out files.

Two measurements per file, both comparable before and after training:

- **hits**: records that list ``expected`` keywords are asked greedily (the template and
  stop words of `tutor chat`); a hit is an answer that contains every keyword
  (case-insensitive). ``total`` counts those records.
- **answer_loss**: records with a reference answer are encoded by `tutor.data.encode`
  (loss on the answers only, as in training) and the model's cross-entropy on those
  answer tokens is averaged over all of them (token-weighted, like one packed batch of
  the whole file). None when the file has no reference answer.

Preference-pair files (records with ``chosen`` and ``rejected``; `tutor.data.load_pairs`) are
scored by `preference_accuracy` instead: the fraction of pairs whose chosen answer the model
finds more likely than the rejected one (summed log-probs, DPO's measure, and per token), and
the mean margin, each pair packed with its prompt once (`tutor.packing.pack_pairs`).

Records may be ``{"question", "expected"[, "answer"][, "system"]}`` (the format of
data/assistant_heldout.jsonl and data/general_probe.jsonl) or any format tutor reads
(`tutor.formats`): the prompt is the conversation before its last assistant message,
which is the reference; ``expected`` may ride along on any record::

    {"question": "What is the capital of France?", "answer": "Paris.", "expected": ["Paris"]}

    scores = score_files(model, tokenizer, "auto", ["data/general_probe.jsonl"])
    scores[0].to_json()   # {"hits": 14, "total": 16, "answer_loss": 1.93}

Not handled: sampling (answers are greedy so runs compare), judging meaning (a keyword
is a substring, so "Paris" also hits "not Paris"), and answers to records without
``expected`` keywords (they are scored by loss only: generating them costs time and
counts nothing). Questions are answered in batches (`tutor.chat.reply_batch`): the same
greedy answers as one at a time, up to float rounding. `score_files` asks the questions of
all its files together, up to `ASK_BATCH` at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.chat import open_session, reply_batch
from tutor.common import IGNORE_INDEX
from tutor.data import encode, encode_pairs, load_pairs, with_system, with_system_prompts
from tutor.errors import TutorError
from tutor.formats import (
    Message,
    detect_format,
    is_pair_record,
    read_records,
    to_messages,
    validate_messages,
)
from tutor.models import keep_4bit_trainable
from tutor.packing import SHARE_BACKENDS, collate, pack_pairs
from tutor.preference import answer_logps
from tutor.templates import get_template
from tutor.train_config import resolve_data_path

# Questions decoded together. A CPU decode step reads every weight once whatever the batch,
# so 32 rows cost little more than 16: the two shipped files (27 questions) take one pass.
ASK_BATCH = 32

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tutor.templates import ChatTemplate


@dataclass
class Item:
    """One scored record: what is asked, the keywords, the conversation with its answer."""

    where: str  # "file:line"
    prompt: list[Message]  # messages before the answer; [] for plain pretraining text
    expected: list[str] = field(default_factory=list)
    reference: list[Message] | None = None  # prompt + reference answer; None = no answer


@dataclass
class ItemScore:
    item: Item
    answer: str | None = None  # the greedy answer (records with keywords only)
    loss: float | None = None  # mean cross-entropy on this record's answer tokens
    tokens: int = 0  # answer tokens the loss is taken over

    @property
    def hit(self) -> bool | None:
        """Every expected keyword in the answer (case-insensitive); None when not asked."""
        if self.answer is None or not self.item.expected:
            return None
        answer = self.answer.lower()
        return all(k.lower() in answer for k in self.item.expected)


@dataclass
class FileScore:
    path: str
    items: list[ItemScore]

    @property
    def hits(self) -> int:
        return sum(bool(s.hit) for s in self.items)

    @property
    def total(self) -> int:
        return sum(s.hit is not None for s in self.items)

    @property
    def answer_loss(self) -> float | None:
        """Token-weighted mean answer loss over the file; None without reference answers."""
        n = sum(s.tokens for s in self.items)
        return sum(s.loss * s.tokens for s in self.items if s.tokens) / n if n else None

    def to_json(self) -> dict[str, Any]:
        return {"hits": self.hits, "total": self.total, "answer_loss": self.answer_loss}

    def mentions(self, words: Sequence[str]) -> int:
        """How many answers contain any of `words` (case-insensitive): e.g. the fine-tuned
        identity showing up in answers to unrelated questions (over-reach)."""
        return sum(any(w.lower() in (s.answer or "").lower() for w in words)
                   for s in self.items)


def _keywords(record: Mapping[str, Any], where: str) -> list[str]:
    value = record.get("expected", [])
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise TutorError(f"{where}: 'expected' must be a list of non-empty keyword strings")
    return value


def _question_only(record: Mapping[str, Any], where: str) -> list[Message]:
    """``{"question"[, "system"]}`` with no answer: the prompt to ask."""
    question, system = record["question"], record.get("system")
    if not isinstance(question, str) or not question.strip():
        raise TutorError(f"{where}: 'question' must be a non-empty string")
    if system is not None and not isinstance(system, str):
        raise TutorError(f"{where}: 'system' must be a string")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}]


def load_items(path: str | Path, system: str | None = None) -> list[Item]:
    """Read a scoring file (see the module docstring); errors name ``file:line``.
    `system` opens every record without a system turn (`tutor.data.with_system`)."""
    items, fmt = [], None
    for where, record in read_records(path):
        if not isinstance(record, Mapping):
            raise TutorError(f"{where}: expected a JSON object, got {type(record).__name__}")
        expected = _keywords(record, where)
        if "question" in record and "answer" not in record:
            items.append(Item(where, with_system(_question_only(record, where), system),
                              expected))
            continue
        fmt = fmt or detect_format(record, where)
        messages = with_system(validate_messages(to_messages(record, fmt, where), where),
                               system)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        items.append(Item(where, messages[:last], expected, messages))
    if not items:
        raise TutorError(f"{path}: no records to score")
    if not any(i.expected or i.reference for i in items):
        raise TutorError(f"{path}: nothing to score: no record has 'expected' keywords "
                         "or a reference answer")
    return items


def answer_loss(model: PreTrainedModel, sample: Mapping[str, list[int]]) -> tuple[float, int]:
    """(mean cross-entropy over the trained tokens of `sample`, how many there are).

    `sample` is `tutor.data.encode`'s ``{"input_ids", "labels"}``; the loss is the
    model's own (labels shifted inside), i.e. the training loss on this one sample.
    """
    import torch

    labels = torch.tensor([sample["labels"]], device=model.device)  # (1, T)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())  # position t predicts label t+1
    if n == 0:
        return float("nan"), 0
    ids = torch.tensor([sample["input_ids"]], device=model.device)  # (1, T)
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=labels).loss), n


def score_items(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                template: ChatTemplate, items: Sequence[Item], max_new_tokens: int = 48,
                echo: bool = False) -> list[ItemScore]:
    """Greedy answers to items with keywords (batched: `tutor.chat.reply_batch`), answer
    loss for items with a reference."""
    scores = [ItemScore(item) for item in items]
    asked = [s for s in scores if s.item.expected and s.item.prompt]
    answers = reply_batch(model, tokenizer, [s.item.prompt for s in asked], max_new_tokens,
                          template, batch_size=ASK_BATCH)
    for s, answer in zip(asked, answers, strict=True):
        s.answer = answer
        if echo:
            mark = "✓" if s.hit else "✗"
            print(f"{mark} {s.item.prompt[-1]['content']}\n    → {s.answer}", flush=True)
    for s in scores:
        if s.item.reference is not None:
            s.loss, s.tokens = answer_loss(model, encode(s.item.reference, tokenizer, template))
    return scores


def score_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                template: str | ChatTemplate, paths: Sequence[str | Path],
                max_new_tokens: int = 48, echo: bool = False,
                system: str | None = None) -> list[FileScore]:
    """Score every file in `paths` with one loaded model (in eval mode while scoring).
    `system`: the system prompt of records without one (a recipe's ``system:``)."""
    if isinstance(template, str):
        template = get_template(template, tokenizer=tokenizer)

    items = {str(p): load_items(p, system) for p in paths}  # every file checked before any work
    was_training = model.training
    model.eval()
    keep_4bit_trainable(model, was_training)  # mid-training: see tutor.trainer
    try:  # every file's questions in one list, so that they share batches
        scores = iter(score_items(model, tokenizer, template,
                                  [i for its in items.values() for i in its], max_new_tokens, echo))
        return [FileScore(p, [next(scores) for _ in its]) for p, its in items.items()]
    finally:
        model.train(was_training)


def evaluate(model: str, paths: Sequence[str | Path], adapter: str | None = None,
             template: str | None = None, max_new_tokens: int = 48,
             echo: bool = False) -> list[FileScore]:
    """Load `model` (+ `adapter`) exactly as `tutor chat` does (its recorded system prompt
    included) and score `paths` (each as
    written, else relative to the shipped recipes: ``data/general_probe.jsonl`` works anywhere)."""
    # As in recipes: relative to the working directory, else to the shipped data.
    paths = [resolve_data_path(p, "tutor eval") for p in paths]
    session = open_session(model, adapter=adapter, template=template)
    return score_files(session.model, session.tokenizer, session.template, paths,
                       max_new_tokens, echo, system=session.system)


@dataclass
class PreferenceScore:
    """Held-out preference accuracy of one pair file under one model (no reference):
    margin = log π(chosen | prompt) − log π(rejected | prompt), summed over answer tokens
    (DPO's own measure); the per-token margin compares mean log-probs instead, which a
    long rejected answer cannot lose by length alone."""

    path: str
    margins: list[float]
    token_margins: list[float]

    @property
    def accuracy(self) -> float:
        """Fraction of pairs whose chosen answer is the more likely one (margin > 0)."""
        return sum(m > 0 for m in self.margins) / len(self.margins)

    @property
    def mean_margin(self) -> float:
        return sum(self.margins) / len(self.margins)

    @property
    def token_accuracy(self) -> float:
        """Fraction of pairs whose chosen answer has the higher mean log-prob per token."""
        return sum(m > 0 for m in self.token_margins) / len(self.token_margins)

    def to_json(self) -> dict[str, Any]:
        return {"pairs": len(self.margins), "accuracy": self.accuracy,
                "mean_margin": self.mean_margin, "token_accuracy": self.token_accuracy,
                "mean_token_margin": sum(self.token_margins) / len(self.token_margins)}


def is_pair_file(path: str | Path) -> bool:
    """True when the file's first record is a preference pair (chosen + rejected)."""
    return is_pair_record(next(iter(read_records(path)), ("", None))[1])


def preference_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        pairs_path: str | Path, template: str | ChatTemplate = "auto",
                        pack_length: int = 1024, system: str | None = None) -> PreferenceScore:
    """Score every pair of `pairs_path` (`tutor.data.load_pairs`): each answer's summed
    log-prob, the prompt computed once per pair (`tutor.packing.pack_pairs`, packs of up to
    `pack_length` tokens, longer pairs alone), in eval mode under inference_mode. `system`
    opens every prompt without a system turn (a recipe's ``system:``)."""
    import torch

    attn = model.config._attn_implementation
    attn = attn if attn in SHARE_BACKENDS else "sdpa"  # flash-attn cannot share the prompt
    pairs, _report = encode_pairs(with_system_prompts(load_pairs(pairs_path), system), tokenizer,
                                  template)
    if not pairs:
        raise TutorError(f"{pairs_path}: no pair to score")
    longest = max(len(q["chosen"]["input_ids"]) + len(q["rejected"]["input_ids"])
                  - q["prompt_length"] for q in pairs)
    margins, token_margins, was_training = [], [], model.training
    model.eval()
    keep_4bit_trainable(model, was_training)  # mid-training: see tutor.trainer
    try:
        with torch.inference_mode():
            for pack in pack_pairs(pairs, max(pack_length, longest)):
                batch = {k: v.to(model.device) for k, v in collate(
                    [pack], attn, tokenizer.pad_token_id, model.dtype).items()}
                sums, counts = answer_logps(model, batch, len(pack["indices"]))
                margins += (sums[0::2] - sums[1::2]).tolist()
                means = sums / counts.clamp(min=1)
                token_margins += (means[0::2] - means[1::2]).tolist()
    finally:
        model.train(was_training)
    return PreferenceScore(str(pairs_path), margins, token_margins)


def evaluate_pairs(model: str, paths: Sequence[str | Path], adapter: str | None = None,
                   template: str | None = None) -> list[PreferenceScore]:
    """`preference_accuracy` of each pair file, the model loaded as `evaluate` loads it."""
    paths = [resolve_data_path(p, "tutor eval") for p in paths]
    session = open_session(model, adapter=adapter, template=template)
    return [preference_accuracy(session.model, session.tokenizer, p, session.template,
                                system=session.system) for p in paths]


def format_table(columns: Mapping[str, Sequence[FileScore]],
                 mention: Sequence[str] = ()) -> str:
    """A Markdown table, one row per file, one column group per model (e.g. before/after).

    With `mention` words, a column counts answers that contain any of them.
    """
    names = list(columns)
    head = ["file"] + [f"{n}: {c}" for n in names
                       for c in ("hits", "answer loss", *(["mentions"] if mention else []))]
    rows = [f"| {' | '.join(head)} |", "|" + " --- |" * len(head)]
    for i, first in enumerate(next(iter(columns.values()))):
        cells = [Path(first.path).name]
        for n in names:
            s = columns[n][i]
            loss = "n/a" if s.answer_loss is None else f"{s.answer_loss:.3f}"
            cells += [f"{s.hits}/{s.total}", loss]
            cells += [str(s.mentions(mention))] if mention else []
        rows.append(f"| {' | '.join(cells)} |")
    return "\n".join(rows)
