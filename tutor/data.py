"""Conversations → token ids and loss labels: the model learns only the answer.

`encode` turns one conversation into ``input_ids`` and ``labels`` of equal length.
Labels copy the ids where the model should learn and hold ``IGNORE_INDEX`` (−100)
everywhere else; PyTorch's cross-entropy skips −100, and Hugging Face causal LMs shift
labels by one internally, so labels are *not* pre-shifted here::

    text    <|im_start|>user⏎Hi<|im_end|>⏎<|im_start|>assistant⏎Hello<|im_end|>⏎
    labels  -100 ............................................  Hello <|im_end|> -100

How the mask is found. The template cuts the rendered text into segments flagged
trainable (each assistant content + its end-of-turn text). The *whole* text is then
tokenised once, and a token is trained when it covers at least one trainable
character. Tokenising segment by segment would be simpler but wrong: BPE merges across
segment boundaries (``"⏎"`` + ``"⏎⏎- step"`` is not ``"⏎⏎⏎- step"`` token-wise), so
the ids would differ from what the model sees at inference. A token that straddles a
boundary is trained, so no answer character is ever left out.

BOS. The rendered text is tokenised with ``add_special_tokens=False``: the template is
the only source of a BOS, so it is never doubled by the tokenizer adding its own (with
``template="auto"`` the ids equal ``tokenizer.apply_chat_template(messages)`` exactly).
When a tokenizer's bos token is also its turn header (ChatML models such as the bundled
SmolLM2: ``<|im_start|>``), it appears once per turn — once at the start, never twice in
a row. Incremental pretraining (``[{"role": "assistant", "content": text}]``) uses no
template: ``[BOS] + text + EOS``, with BOS only if the tokenizer adds one to plain text,
and every text token plus EOS trained.

Not handled: packing (``tutor.packing``), padding, left truncation, tool messages, and
slow (non-"fast") tokenizers, which cannot report character offsets.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.common import IGNORE_INDEX, Message, Sample
from tutor.errors import TutorError
from tutor.formats import iter_conversations, validate_messages
from tutor.quiet import no_progress_bars
from tutor.templates import ChatTemplate, Segment, get_template

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

TRAIN_ON = ("all", "last")


def load_conversations(path_or_dataset: Any, format: str = "auto") -> datasets.Dataset:
    """Read a .jsonl/.json/.csv file or a `datasets.Dataset` into a Dataset with one
    column, ``messages``. Formats: see `tutor.formats` (openai, alpaca, sharegpt, xtuner,
    qa, text). The first bad record raises `TutorError` naming ``file:line``."""
    import datasets

    rows = [messages for _, messages in iter_conversations(path_or_dataset, format)]
    return datasets.Dataset.from_dict({"messages": rows})


def is_pretraining(messages: Sequence[Message]) -> bool:
    """True for plain text in conversation form: a single assistant message."""
    return len(messages) == 1 and messages[0]["role"] == "assistant"


def with_system(messages: Sequence[Message], system: str | None) -> list[Message]:
    """`messages` with ``{"role": "system", "content": system}`` put first (a recipe's
    ``system:`` key). Unchanged when `system` is None (the template's own default then
    applies), when the conversation already opens with a system turn (its own wins), and
    for pretraining text (`is_pretraining`: no turns to frame)."""
    msgs = list(messages)
    if system is None or not msgs or msgs[0]["role"] == "system" or is_pretraining(msgs):
        return msgs
    return [{"role": "system", "content": system}, *msgs]


def encode(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate = "auto",
    max_length: int | None = None,
    train_on: str = "all",
) -> Sample:
    """Token ids and labels of one conversation (see the module docstring).

    `train_on="last"` trains only the last assistant turn. `max_length` keeps the first
    `max_length` tokens. Raises `TutorError` if no trainable token is left (use
    `encode_dataset` to drop and count such samples instead).
    """
    sample, _ = encode_sample(messages, tokenizer, template, max_length, train_on)
    if all(label == IGNORE_INDEX for label in sample["labels"]):
        if max_length is None:  # only a template with no end-of-turn text and an empty answer
            raise TutorError("no trainable token: the answers are empty and the template has "
                             "no end-of-turn text")
        raise TutorError(f"no trainable token left after truncation to max_length={max_length}: "
                         "raise max_length or shorten the prompt")
    return sample


def encode_sample(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate,
    max_length: int | None,
    train_on: str,
) -> tuple[Sample, EncodeInfo]:
    """`encode` without the empty-mask check (callers count empty samples), plus an
    `EncodeInfo` saying what happened on the way."""
    _check_options(max_length, train_on)
    messages = validate_messages(messages)
    if is_pretraining(messages):
        ids, labels = _encode_text(messages[0]["content"], tokenizer)
        straddling = 0
    else:
        if not getattr(tokenizer, "is_fast", False):
            raise TutorError("encode needs a fast tokenizer (character offsets); "
                             "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        segments = _template(template, tokenizer).segments(messages)
        if train_on == "last":
            segments = _only_last_answer(segments)
        ids, labels, straddling = _encode_segments(segments, tokenizer)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}, EncodeInfo(len(ids), truncated, straddling)


@dataclass(frozen=True)
class EncodeInfo:
    """Side facts about one encoded sample (`tutor data check` reports them)."""

    length: int  # tokens after truncation
    truncated: bool
    straddling: int  # tokens that BPE merged across a trained/untrained boundary


def _check_options(max_length: int | None, train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise TutorError(f"train_on must be one of {', '.join(TRAIN_ON)}, not '{train_on}'")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise TutorError(f"max_length must be a positive integer or None, not {max_length!r}")


@functools.lru_cache(maxsize=8)
def _template(template: str | ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    # Cached: "auto" probes the tokenizer's Jinja when built, and datasets calls us per row.
    return template if isinstance(template, ChatTemplate) else get_template(template, tokenizer)


def _only_last_answer(segments: list[Segment]) -> list[Segment]:
    """Keep `trainable` only on the last run of trainable segments (the last answer)."""
    last_run: list[int] = []
    for i, seg in enumerate(segments):
        if seg.trainable:
            last_run = last_run + [i] if last_run and last_run[-1] == i - 1 else [i]
    keep = set(last_run)
    return [s if i in keep else replace(s, trainable=False) for i, s in enumerate(segments)]


def _encode_segments(
    segments: list[Segment], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int], int]:
    """Tokenise the joined text once; label each token by the characters it covers.

    Also counts the tokens that cover trainable *and* untrained characters: harmless
    but worth a warning (the template's markers may not be tokens of this vocabulary).
    """
    text = "".join(s.text for s in segments)
    trained_before = [0]  # trained_before[c] = number of trainable characters in text[:c]
    for seg in segments:
        for _ in seg.text:
            trained_before.append(trained_before[-1] + seg.trainable)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, straddling = list(enc["input_ids"]), [], 0
    for tid, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        start, end = min(start, len(text)), min(max(end, start + 1), len(text))
        # (a zero-width token is judged by the character it sits on)
        covered = trained_before[end] - trained_before[start]
        labels.append(tid if covered > 0 else IGNORE_INDEX)
        straddling += 0 < covered < end - start
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        raise TutorError("the template renders BOS twice at the start; fix its bos setting")
    return ids, labels, straddling


def _encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Pretraining text: ``[BOS] + text + EOS``; every text token and EOS trained."""
    if tokenizer.eos_token_id is None:
        raise TutorError("pretraining text needs an EOS token, and this tokenizer has none")
    body = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id]
    return bos + body + eos, [IGNORE_INDEX] * len(bos) + body + eos


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Does this tokenizer put a BOS in front of plain text by itself (Llama: yes, ChatML: no)?"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


@dataclass
class EncodeReport:
    """What `encode_dataset` did: nothing is dropped without being counted here."""

    samples: int
    kept: int
    dropped: int
    truncated: int
    tokens: int  # in kept samples
    trainable_tokens: int  # labels != -100 in kept samples
    dropped_rows: list[int] = field(default_factory=list)

    @property
    def trainable_ratio(self) -> float:
        return self.trainable_tokens / self.tokens if self.tokens else 0.0

    def __str__(self) -> str:
        rows = f" (rows {self.dropped_rows[:10]})" if self.dropped else ""
        return (f"{self.samples} samples: {self.kept} kept, {self.dropped} dropped with no "
                f"trainable token{rows}, {self.truncated} truncated; {self.tokens} tokens, "
                f"{self.trainable_tokens} trained ({self.trainable_ratio:.1%})")


def encode_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate = "auto",
    max_length: int | None = None,
    train_on: str = "all",
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[datasets.Dataset, EncodeReport]:
    """Encode every ``messages`` row with `datasets.map`; drop and count empty-mask rows.

    Returns a Dataset with columns ``input_ids`` and ``labels`` plus an `EncodeReport`
    (a warning is also issued when rows are dropped). Caching: a dataset read from disk
    by `datasets` is cached by `datasets` itself; for an in-memory dataset (such as
    `load_conversations` returns) pass `cache_dir` to cache the result there, keyed by
    the data, tokenizer, template and options.
    """
    if "messages" not in dataset.column_names:
        raise TutorError(f"the dataset needs a 'messages' column (has {dataset.column_names}); "
                         "read it with tutor.data.load_conversations")
    _check_options(max_length, train_on)
    kwargs = {"tokenizer": tokenizer, "template": template, "max_length": max_length,
              "train_on": train_on}
    with no_progress_bars("datasets"):  # small datasets encode in a blink
        encoded = dataset.map(
            _encode_row, fn_kwargs=kwargs, with_indices=True, num_proc=num_proc,
            remove_columns=dataset.column_names,
            cache_file_name=_cache_file(dataset, kwargs, cache_dir, "encoded"),
        )
        kept = encoded.filter(
            lambda n: n > 0, input_columns="num_trainable",
            cache_file_name=_cache_file(dataset, kwargs, cache_dir, "kept"),
        )
    n_trainable = encoded["num_trainable"]
    dropped = [i for i, n in enumerate(n_trainable) if n == 0]
    report = EncodeReport(
        samples=len(encoded), kept=len(kept), dropped=len(dropped),
        truncated=sum(encoded["truncated"]), tokens=sum(len(x) for x in kept["input_ids"]),
        trainable_tokens=sum(n_trainable), dropped_rows=dropped,
    )
    if dropped:
        warnings.warn(f"encode_dataset: {report}", stacklevel=2)
    return kept.remove_columns(["num_trainable", "truncated"]), report


def _encode_row(row: dict[str, Any], index: int, **kwargs: Any) -> dict[str, Any]:
    try:
        sample, info = encode_sample(row["messages"], **kwargs)
    except TutorError as exc:
        raise TutorError(f"dataset row {index}: {exc}") from exc
    n = sum(label != IGNORE_INDEX for label in sample["labels"])
    return {**sample, "num_trainable": n, "truncated": info.truncated}


def _cache_file(dataset: datasets.Dataset, kwargs: dict[str, Any], cache_dir: str | Path | None,
                step: str) -> str | None:
    if cache_dir is None or dataset.cache_files:
        return None  # no caching asked for, or datasets caches a disk-backed dataset itself
    from datasets.fingerprint import Hasher

    from tutor import __version__

    key = Hasher.hash([dataset._fingerprint, kwargs, step, __version__])
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(cache_dir) / f"{step}-{key}.arrow")
