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

Preference pairs (`load_pairs`, `encode_pair`): one prompt, a chosen and a rejected answer.
Each side is encoded exactly as `encode` encodes prompt + answer; ``prompt_length`` p says how
many leading tokens the two sides share and may store once when packed (`tutor.packing.
pack_pairs`)::

    chosen    <|im_start|>user⏎Hi<|im_end|>⏎<|im_start|>assistant⏎ Hello! <|im_end|>⏎
    rejected  <|im_start|>user⏎Hi<|im_end|>⏎<|im_start|>assistant⏎ Go away. <|im_end|>⏎
              └──────────────── p shared tokens ───────────────┘⏎  (token p: untrained too)

Not handled: packing (``tutor.packing``), padding, left truncation, tool messages, and
slow (non-"fast") tokenizers, which cannot report character offsets. Pairs are never
truncated (a cut answer loses its end-of-turn token, and DPO would prefer the cut).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor import __version__
from tutor.common import IGNORE_INDEX, Message, Sample
from tutor.errors import TutorError
from tutor.formats import PAIRS_FORMAT, iter_conversations, iter_pairs, validate_messages
from tutor.offline import no_progress_bars
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

    key = Hasher.hash([dataset._fingerprint, kwargs, step, __version__])
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(cache_dir) / f"{step}-{key}.arrow")


# ---------------------------------------------------------------- preference pairs

PairSample = dict[str, Any]  # {"chosen": Sample, "rejected": Sample, "prompt_length": int}


def load_pairs(path_or_dataset: Any, format: str = "auto") -> datasets.Dataset:
    """Read preference pairs (a .jsonl/.json/.csv file or a `datasets.Dataset`; record formats
    in `tutor.formats`) into a Dataset with columns ``prompt`` (messages ending with a user
    turn), ``chosen`` and ``rejected`` (lists of assistant messages, normally one). The first
    bad record raises `TutorError` naming ``file:line``. `format`: "auto" or "pairs" (every
    pair shape is told apart by its keys)."""
    import datasets

    if format not in ("auto", PAIRS_FORMAT):
        raise TutorError(f"load_pairs: format={format!r}; use auto or {PAIRS_FORMAT}")
    rows = [pair for _, pair in iter_pairs(path_or_dataset)]
    return datasets.Dataset.from_dict({k: [r[i] for r in rows] for i, k in
                                       enumerate(("prompt", "chosen", "rejected"))})


def with_system_prompts(pairs: datasets.Dataset, system: str | None) -> datasets.Dataset:
    """`load_pairs`' rows with `system` opening every prompt (`with_system`; unchanged when
    `system` is None or a prompt has its own system turn)."""
    import datasets

    if system is None:
        return pairs
    return datasets.Dataset.from_dict({"prompt": [with_system(p, system) for p in pairs["prompt"]],
                                       "chosen": pairs["chosen"], "rejected": pairs["rejected"]})


def encode_pair(
    prompt: Sequence[Message],
    chosen: Sequence[Message],
    rejected: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate = "auto",
    max_length: int | None = None,
) -> PairSample:
    """Encode one preference pair: ``{"chosen": {"input_ids", "labels"}, "rejected": {...},
    "prompt_length": p}``.

    Each side is `encode(prompt + answer)`, except that any assistant turn *inside the prompt*
    is context, not trained (its labels are -100; a single-turn prompt changes nothing). p is
    the largest count such that both sides have the same tokens ``[0, p)`` and no trained
    token in ``[0, p]``: the shared prompt, minus its last token (normally the end of the
    assistant header), so that each side's own span begins with an untrained token.

    Raises `TutorError` (one line) when: the prompt's tokens are not a prefix of
    prompt + answer (BPE merged the end of the prompt with the answer's first characters),
    a side has no trained token, chosen and rejected are the same tokens, or a side is
    longer than `max_length` (pairs are never truncated; `encode_pairs` drops and counts
    them instead).
    """
    _check_options(max_length, "all")
    tmpl = _template(template, tokenizer)
    prompt = list(prompt)
    prompt_ids = tokenizer(tmpl.render(prompt, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    sides = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        sample, _ = encode_sample(prompt + list(answer), tokenizer, tmpl, None, "all")
        ids, n = sample["input_ids"], len(prompt_ids)
        if ids[:n] != prompt_ids:
            raise TutorError(f"{name}: the prompt's {n} tokens are not a prefix of prompt + "
                             f"{name} (the answer's first characters merge with the end of the "
                             "prompt; does it start with whitespace?)")
        labels = [IGNORE_INDEX] * n + sample["labels"][n:]  # the prompt is context
        if all(label == IGNORE_INDEX for label in labels):
            raise TutorError(f"{name}: no trainable token (an empty answer with a template "
                             "that has no end-of-turn text)")
        if max_length is not None and len(ids) > max_length:
            raise TutorError(f"{name}: {len(ids)} tokens, longer than max_length={max_length} "
                             "(pairs are not truncated)")
        sides[name] = {"input_ids": ids, "labels": labels}
    c, r = sides["chosen"], sides["rejected"]
    if c["input_ids"] == r["input_ids"]:
        raise TutorError("chosen and rejected are the same tokens: nothing to prefer")
    return {**sides, "prompt_length": _shared_untrained(c, r)}


def _shared_untrained(a: Sample, b: Sample) -> int:
    """Largest p with a, b equal on [0, p) and untrained on [0, p] (see `encode_pair`)."""
    p = 0
    while (p + 1 < min(len(a["input_ids"]), len(b["input_ids"]))
           and a["input_ids"][p] == b["input_ids"][p]
           and a["labels"][p + 1] == b["labels"][p + 1] == IGNORE_INDEX
           and a["labels"][p] == IGNORE_INDEX):
        p += 1
    return p


@dataclass
class PairReport:
    """What `encode_pairs` did: every dropped pair is counted and named."""

    pairs: int
    kept: int
    too_long: list[str] = field(default_factory=list)  # where each dropped pair came from
    tokens: int = 0  # both sides of the kept pairs, the prompt counted twice

    def __str__(self) -> str:
        where = f" ({', '.join(self.too_long[:5])})" if self.too_long else ""
        return (f"{self.pairs} pairs: {self.kept} kept, {len(self.too_long)} dropped as longer "
                f"than max_length{where}; {self.tokens} tokens")


def encode_pairs(
    pairs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate = "auto",
    max_length: int | None = None,
) -> tuple[list[PairSample], PairReport]:
    """`encode_pair` on every row of a `load_pairs` Dataset. Pairs with a side longer than
    `max_length` are dropped and counted (with a warning); any other problem raises,
    naming the row."""
    for col in ("prompt", "chosen", "rejected"):
        if col not in pairs.column_names:
            raise TutorError(f"the dataset needs prompt/chosen/rejected columns (has "
                             f"{pairs.column_names}); read it with tutor.data.load_pairs")
    out: list[PairSample] = []
    report = PairReport(pairs=len(pairs), kept=0)
    for i, row in enumerate(pairs):
        try:
            sample = encode_pair(row["prompt"], row["chosen"], row["rejected"], tokenizer,
                                 template)
        except TutorError as exc:
            raise TutorError(f"dataset row {i}: {exc}") from exc
        if max_length is not None and max(pair_lengths(sample)[:2]) > max_length:
            report.too_long.append(f"row {i}")
            continue
        out.append(sample)
        report.tokens += sum(pair_lengths(sample)[:2])
    report.kept = len(out)
    if report.too_long:
        warnings.warn(f"encode_pairs: {report}", stacklevel=2)
    return out, report


def pair_lengths(pair: PairSample) -> tuple[int, int, int]:
    """(chosen tokens, rejected tokens, prompt_length) of an `encode_pair` result."""
    return len(pair["chosen"]["input_ids"]), len(pair["rejected"]["input_ids"]), \
        pair["prompt_length"]
