"""Multi-sample packing: many short samples in few fixed-length rows, and still exact.

Data flow: ``encode()`` gives samples ``{"input_ids": [...], "labels": [...]}`` →
:func:`pack` groups them into packs of at most ``max_length`` tokens → :func:`collate`
turns a batch of packs into tensors for ``model(**batch)``. :class:`PackedDataset`
wraps both for ``transformers.Trainer`` (one packing per epoch).

Packing is exact only with *isolation*: a token may attend to earlier tokens of its own
sample and nothing else. With transformers 5.23, SDPA/eager do not infer that from
restarted ``position_ids`` once an ``attention_mask`` is passed or a KV cache is built
(``use_cache=True``, the default, builds one even in a training forward), so
:func:`collate` builds a 4-D block-diagonal causal mask for them; flash-attention-2
instead gets one flattened row whose restarted ``position_ids`` transformers turns into
``cu_seqlens`` (varlen kernels).

Loss: ``collate`` sets the label of every sample's first token to -100, so the last token
of one sample is never trained to predict the first token of the next. transformers'
causal-LM loss is then the mean over all trained tokens of the batch, which is exactly the
token-weighted mean of the same samples run one by one (tests/test_packing.py checks it).

Shared prefix (``share_prefix=True``): chat samples often begin with the same untrained
tokens, e.g. the template's default system turn (SmolLM2's is 20 tokens of a ~65-token course
sample). A pack can hold that prefix once: the first sample is stored whole, every later one
without the prefix, its positions continuing where the prefix ended (``0..p-1`` then ``p..``),
and attention lets it see the prefix and itself (`tutor.attention.spans`). What each sample
computes is what it computes alone (a causal prefix does not depend on what follows it), so
the loss is the same and the prefix's gradient is the sum the copies would get; the FLOPs
of the copies are saved. Only samples whose prefix and the token after it are untrained
share (the first token after the prefix would otherwise be predicted from the previous
sample). Under dropout the copies would draw different masks and the one prefix draws one.

Preference pairs (:func:`pack_pairs`) use the same spans: each pair is its chosen side whole,
then its rejected side continuing the shared prompt's positions, so the prompt is computed once
per pair and both answers see it; ``pair_ids`` tell the loss which tokens belong to which side.

Not handled here: splitting a long sample across packs (it is truncated or dropped, and
counted), flex-attention block masks, packing for generation (no KV cache), and models
whose loss is not transformers' ``ForCausalLMLoss``.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tutor.attention import SDPA_VARLEN, span_index, span_starts, spans
from tutor.common import IGNORE_INDEX, Sample
from tutor.errors import TutorError

if TYPE_CHECKING:
    import torch

STRATEGIES = ("bfd", "greedy")
OVERFLOWS = ("truncate", "drop")
MASK_BACKENDS = ("sdpa", "eager")  # get a 4-D mask
# get position_ids only; sdpa_varlen is tutor's CPU counterpart of flash-attn's varlen path
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", SDPA_VARLEN)


def _is_varlen(attn_implementation: str) -> bool:
    """Backends that take the flattened layout: flash-attention (also from the kernels hub,
    "kernels-community/flash-attn2") and `tutor.attention`'s sdpa_varlen."""
    return attn_implementation in VARLEN_BACKENDS or "flash-attn" in attn_implementation


# A pack: the concatenated samples, positions restarting at 0 per sample (or continuing a
# shared prefix), input indices.
Pack = dict[str, list[int]]  # {"input_ids", "labels", "position_ids", "indices"}
SHARE_BACKENDS = ("sdpa", "eager", SDPA_VARLEN)  # attention that can see a shared prefix


@dataclass
class Packs(Sequence):
    """The result of :func:`pack`: a sequence of packs plus what happened to long samples."""

    packs: list[Pack]
    max_length: int
    strategy: str
    truncated: int = 0  # samples cut to max_length (overflow="truncate")
    dropped: int = 0  # samples left out because longer than max_length (overflow="drop")
    lengths: list[int] = field(default_factory=list, repr=False)  # per pack, real tokens
    saved: int = 0  # tokens not stored because a shared prefix stands for them (share_prefix)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i):  # int → Pack, slice → list[Pack]
        return self.packs[i]

    @property
    def utilisation(self) -> float:
        """Real tokens / slots, every pack counted as a full row of ``max_length``."""
        return sum(self.lengths) / (len(self.packs) * self.max_length) if self.packs else 0.0

    @property
    def min_packs(self) -> int:
        """Fewest packs any packer could use: ceil(tokens / max_length)."""
        return -(-sum(self.lengths) // self.max_length)

    def stats(self) -> dict[str, Any]:
        """Counts and utilisation, ready to print or log."""
        return {
            "strategy": self.strategy,
            "max_length": self.max_length,
            "packs": len(self.packs),
            "min_packs": self.min_packs,
            "samples": sum(len(p["indices"]) for p in self.packs),
            "tokens": sum(self.lengths),
            "utilisation": self.utilisation,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "saved": self.saved,
        }


def _check_sample(i: int, s: Any) -> int:
    """Length of sample `i`, or a TutorError naming what is wrong with it."""
    if not isinstance(s, dict) or "input_ids" not in s or "labels" not in s:
        raise TutorError(
            f"sample {i}: expected a dict with 'input_ids' and 'labels' (from encode())"
        )
    n = len(s["input_ids"])
    if n == 0:
        raise TutorError(f"sample {i}: 'input_ids' is empty")
    if len(s["labels"]) != n:
        raise TutorError(f"sample {i}: 'labels' has {len(s['labels'])} items, 'input_ids' has {n}")
    return n


def _greedy(lengths: Mapping[int, int], order: list[int], max_length: int) -> list[list[int]]:
    """XTuner-style next-fit: walk the samples in order, start a new pack when one won't fit."""
    bins: list[list[int]] = []
    used = max_length  # forces a new pack for the first sample
    for i in order:
        if used + lengths[i] > max_length:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += lengths[i]
    return bins


def _bfd(lengths: Mapping[int, int], order: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the open pack it fills most tightly.

    ``free`` is kept sorted as (remaining, pack id), so the best fit is one bisect away
    (O(n log n) search; list insertion is a C memmove).
    """
    by_size = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep `order`
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in by_size:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # smallest remaining space that still fits n
        if j < len(free):
            remaining, b = free.pop(j)
        else:
            remaining, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return bins


def pack(
    samples: Iterable[Sample],
    max_length: int,
    strategy: str = "bfd",
    overflow: str = "truncate",
    seed: int | None = None,
    share_prefix: bool = False,
) -> Packs:
    """Group samples into packs of at most `max_length` tokens.

    strategy: ``"greedy"`` is next-fit in the given order (XTuner-style); ``"bfd"`` is
    best-fit decreasing: no two of its packs could be merged, and (property-tested, not
    proven) it never needs more packs than greedy over the same samples taken longest
    first. It is a heuristic: a lucky order can let greedy win (see the tests).
    overflow: a sample longer than `max_length` is cut to its first `max_length` tokens
    (``"truncate"``) or left out (``"drop"``); both are counted in the result.
    seed: ``None`` keeps the input order (greedy) / size order (bfd); an int shuffles the
    samples (greedy) or ties and the order of packs (bfd), reproducibly.
    share_prefix: the samples that begin with `shared_prefix` are packed among themselves,
    each pack holding the prefix once (module docstring); the others are packed as usual.

    >>> s = lambda n: {"input_ids": [1] * n, "labels": [1] * n}
    >>> [seq_lens(p) for p in pack([s(3), s(6), s(2), s(4)], 8)]
    [[6, 2], [4, 3]]
    >>> [seq_lens(p) for p in pack([s(3), s(6), s(2), s(4)], 8, strategy="greedy")]
    [[3], [6, 2], [4]]
    """
    _check_options("pack", strategy, max_length)
    if overflow not in OVERFLOWS:
        raise TutorError(f"pack: overflow={overflow!r}; choose one of {', '.join(OVERFLOWS)}")
    kept: dict[int, Sample] = {}
    truncated = dropped = 0
    for i, s in enumerate(samples):
        n = _check_sample(i, s)
        if n > max_length:
            if overflow == "drop":
                dropped += 1
                continue
            truncated += 1
            s = {"input_ids": s["input_ids"][:max_length], "labels": s["labels"][:max_length]}
        kept[i] = s
    prefix = shared_prefix(list(kept.values())) if share_prefix else []
    sharing = {i for i, s in kept.items() if _shares(s, prefix)}
    order = list(kept)
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    packer = _bfd if strategy == "bfd" else _greedy
    # Two groups packed apart; a sharing sample's rest fills max_length - p (the prefix once).
    groups = [([i for i in order if i not in sharing], []),
              ([i for i in order if i in sharing], prefix)]
    bins = [(b, pre) for ids, pre in groups if ids
            for b in packer({i: len(kept[i]["input_ids"]) - len(pre) for i in ids}, ids,
                            max_length - len(pre))]
    if seed is not None and strategy == "bfd":
        rng.shuffle(bins)  # otherwise the longest samples would all come first
    packs = [_join([kept[i] for i in b], b, pre) for b, pre in bins]
    saved = sum(len(pre) * (len(b) - 1) for b, pre in bins)
    return Packs(packs, max_length, strategy, truncated, dropped,
                 [len(p["input_ids"]) for p in packs], saved)


def _check_options(caller: str, strategy: str, max_length: Any) -> None:
    if strategy not in STRATEGIES:
        raise TutorError(f"{caller}: strategy={strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not isinstance(max_length, int) or max_length < 1:
        raise TutorError(f"{caller}: max_length must be a positive int, got {max_length!r}")


def _join(samples: list[Sample], indices: list[int], prefix: Sequence[int] = ()) -> Pack:
    """The samples one after the other; with a `prefix` (which each of them starts with), the
    first whole and the others without it, their positions continuing the prefix's."""
    parts = [(s, len(prefix) if k else 0) for k, s in enumerate(samples)]  # (sample, cut)
    return {
        "input_ids": [t for s, c in parts for t in s["input_ids"][c:]],
        "labels": [t for s, c in parts for t in s["labels"][c:]],
        # Restarting (or jumping) positions mark where each sample begins. They are also a
        # forward argument of the model, so Trainer's remove_unused_columns keeps them.
        "position_ids": [k for s, c in parts for k in range(c, len(s["input_ids"]))],
        "indices": list(indices),  # informational; Trainer drops it before collate
    }


def shared_prefix(samples: Sequence[Sample]) -> list[int]:
    """The longest token prefix that at least half of the samples (two at least) begin with
    and may share: all of it untrained, and the token after it untrained too. [] if none.

    >>> s = lambda ids, n_trained: {"input_ids": ids, "labels": [-100] * (len(ids) - n_trained)
    ...                             + ids[len(ids) - n_trained:]}
    >>> shared_prefix([s([1, 2, 3, 7, 8], 1), s([1, 2, 3, 9, 8, 8], 2), s([5, 6], 1)])
    [1, 2, 3]
    """
    group, prefix = list(samples), []
    need = max(2, -(-len(samples) // 2))
    while True:
        k = len(prefix)
        counts: dict[int, int] = {}
        for s in group:
            if len(s["input_ids"]) > k + 1 and s["labels"][k] == s["labels"][k + 1] == IGNORE_INDEX:
                counts[s["input_ids"][k]] = counts.get(s["input_ids"][k], 0) + 1
        token, n = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
        if n < need:
            return prefix
        prefix.append(token)
        group = [s for s in group if _shares(s, prefix)]


def _shares(s: Sample, prefix: Sequence[int]) -> bool:
    """`s` begins with a non-empty `prefix`, and neither it nor the next token is trained."""
    p = len(prefix)
    return (p > 0 and len(s["input_ids"]) > p and s["input_ids"][:p] == list(prefix)
            and all(t == IGNORE_INDEX for t in s["labels"][:p + 1]))


def pack_pairs(
    pairs: Iterable[Mapping[str, Any]],
    max_length: int,
    strategy: str = "bfd",
    seed: int | None = None,
) -> Packs:
    """Pack preference pairs (`tutor.data.encode_pair` results), the prompt once per pair.

    A pair is never split across packs. In its pack it takes ``len(chosen) + len(rejected)
    - p`` tokens (p = its ``prompt_length``): chosen whole (positions ``0..``), then rejected
    without its first p tokens, its positions continuing from p, so it attends to the p
    prompt tokens of its chosen span and to itself (the shared-prefix spans of
    `tutor.attention`). Each pack also carries ``pair_ids``, one per token: 2k for pair k's
    chosen span (prompt included), 2k+1 for its rejected span; ``indices`` names the pairs.
    One pair, prompt ``P P P`` (p = 3), untrained header end ``h``, answers ``c c`` / ``r``::

        input_ids     P P P h c c | h r       position_ids  0 1 2 3 4 5 | 3 4
        pair_ids      0 0 0 0 0 0 | 1 1       labels        - - - - c c | - r
        mask (query ↓, key →):
            1 . . . . . . .
            1 1 . . . . . .
            1 1 1 . . . . .
            1 1 1 1 . . . .
            1 1 1 1 1 . . .
            1 1 1 1 1 1 . .
            1 1 1 . . . 1 .     rejected's h: the prompt, not chosen's h c c
            1 1 1 . . . 1 1

    Every token computes what it computes in prompt + answer alone (tests/test_pairs.py), so
    the per-sequence log-probabilities are exact while the prompt is computed once, not twice
    (``saved`` counts the tokens). A pair longer than `max_length` is left out and counted in
    ``dropped``. `strategy` and `seed` as in `pack` (each pair is one item of its length).

    Not handled: flash-attention's varlen kernels (cu_seqlens only: no shared prefix; use
    sdpa_varlen, sdpa or eager), pairs whose answers share trained tokens (p stops before
    the first trained token, which is correct but shares less).
    """
    _check_options("pack_pairs", strategy, max_length)
    kept: dict[int, Mapping[str, Any]] = {}
    lengths: dict[int, int] = {}
    dropped = 0
    for i, pair in enumerate(pairs):
        n = _check_pair(i, pair)
        if n > max_length:
            dropped += 1
            continue
        kept[i], lengths[i] = pair, n
    order = list(kept)
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    bins = (_bfd if strategy == "bfd" else _greedy)(lengths, order, max_length)
    if seed is not None and strategy == "bfd":
        rng.shuffle(bins)  # otherwise the longest pairs would all come first
    packs = [_join_pairs([kept[i] for i in b], b) for b in bins]
    return Packs(packs, max_length, strategy, 0, dropped, [len(p["input_ids"]) for p in packs],
                 sum(q["prompt_length"] for q in kept.values()))


def _check_pair(i: int, pair: Any) -> int:
    """Tokens pair `i` takes in a pack, or a TutorError naming what is wrong with it."""
    if not isinstance(pair, Mapping) or not {"chosen", "rejected", "prompt_length"} <= set(pair):
        raise TutorError(f"pair {i}: expected a dict with chosen, rejected and prompt_length "
                         "(from tutor.data.encode_pair)")
    c, r = pair["chosen"], pair["rejected"]
    for side in (c, r):
        _check_sample(i, side)
    p = pair["prompt_length"]
    if not (isinstance(p, int) and 0 <= p < min(len(c["input_ids"]), len(r["input_ids"]))
            and c["input_ids"][:p] == r["input_ids"][:p]
            and all(t == IGNORE_INDEX for s in (c, r) for t in s["labels"][:p + 1])):
        raise TutorError(f"pair {i}: prompt_length={p!r} is not a shared, untrained prefix "
                         "of chosen and rejected (plus the token after it)")
    return len(c["input_ids"]) + len(r["input_ids"]) - p


def _join_pairs(pairs: list[Mapping[str, Any]], indices: list[int]) -> Pack:
    """The pairs one after the other, each laid out as in `pack_pairs`."""
    parts = [_join([q["chosen"], q["rejected"]], [i, i],
                   q["chosen"]["input_ids"][:q["prompt_length"]])
             for q, i in zip(pairs, indices, strict=True)]
    out: Pack = {k: [x for part in parts for x in part[k]]
                 for k in ("input_ids", "labels", "position_ids")}
    out["indices"] = list(indices)
    out["pair_ids"] = [2 * k + side for k, q in enumerate(pairs)
                       for side, n in enumerate(seq_lens(parts[k])) for _ in range(n)]
    return out


def seq_lens(p: Pack) -> list[int]:
    """Lengths of the spans in pack `p` (one per sample; a sample that continues a shared
    prefix counts without it), read from its ``position_ids``."""
    return [end - start for start, end, _ in spans(p["position_ids"])]


def padding_utilisation(
    lengths: Sequence[int], batch_size: int, max_length: int | None = None
) -> float:
    """The baseline without packing: real tokens / slots when batches are padded.

    Batches are `batch_size` consecutive samples; each row is padded to the longest in its
    batch (dynamic padding), or to `max_length` when given (static padding).
    """
    if not lengths:
        return 0.0
    slots = 0
    for b in range(0, len(lengths), batch_size):
        batch = lengths[b : b + batch_size]
        slots += len(batch) * (max_length if max_length is not None else max(batch))
    return sum(lengths) / slots


def collate(
    packs: Sequence[Pack],
    attn_implementation: str = "sdpa",
    pad_token_id: int = 0,
    mask_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Batch packs into tensors for ``model(**batch)``, each sample isolated.

    Returns ``input_ids``, ``labels``, ``position_ids`` and, for SDPA/eager,
    ``attention_mask``. Rows are right-padded to the longest pack in the batch; padding is
    its own block, never a label, and its id (`pad_token_id`) cannot affect real tokens.

    - ``"sdpa"``: ``attention_mask`` is bool ``(B, 1, L, L)``, True = may attend.
    - ``"eager"``: the same mask as additive float (0 or the dtype's minimum) in
      `mask_dtype` (default float32): eager *adds* the mask to the scores, so a bool mask
      would be silently wrong there.
    - ``"flash_attention_2"``/``"_3"``: all packs are flattened into one row ``(1, T)``,
      no mask; transformers derives ``cu_seqlens`` from the restarted ``position_ids``
      (its varlen path needs batch size 1). Unverified here: no GPU on our machines.
    - ``"sdpa_varlen"`` (`tutor.attention.register`): the same flattened row; SDPA then
      runs causal on each sample's span.

    Packs with a shared prefix (``pack(..., share_prefix=True)``) work with sdpa, eager and
    sdpa_varlen: the masks also let each later sample see the prefix (`_block_mask`).

    Two packs with ``seq_lens`` [3, 2] and [4] (``.`` = masked, ``p`` = padding's block)::

        input_ids    a a a b b | c c c c        position_ids  0 1 2 0 1 | 0 1 2 3 0
        labels       - a a - b | - c c c        (first token of a sample: -100)
        mask of row 0 (query ↓, key →), L = 5:
            1 . . . .
            1 1 . . .
            1 1 1 . .
            . . . 1 .
            . . . 1 1
        mask of row 1:
            1 . . . .
            1 1 . . .
            1 1 1 . .
            1 1 1 1 .
            . . . . p

    Pair packs (`pack_pairs`) add ``pair_ids`` (B, L) long: pair k of the batch, counted in
    pack order, has 2k on its chosen span and 2k+1 on its rejected span; padding is -1 (in
    the flattened varlen row too). Sum per-token log-probabilities by it to get each
    sequence's (only tokens whose label is not -100 count). The model does not take
    ``pair_ids``: pop it before ``model(**batch)``. A batch mixing pair and sample packs is
    refused.

    Not handled: packs longer than you can afford as an L×L mask (it is O(L²) memory).
    """
    import torch

    varlen = _is_varlen(attn_implementation)
    if attn_implementation not in MASK_BACKENDS and not varlen:
        raise TutorError(
            f"collate: attn_implementation={attn_implementation!r} is not supported; "
            f"use one of {', '.join(MASK_BACKENDS + VARLEN_BACKENDS)}"
        )
    if not packs:
        raise TutorError("collate: got no packs")
    for r, p in enumerate(packs):
        if not isinstance(p, dict) or not {"input_ids", "labels", "position_ids"} <= p.keys():
            raise TutorError(
                f"collate: pack {r} lacks input_ids/labels/position_ids; build it with pack()"
            )
    paired = sum("pair_ids" in p for p in packs)
    if paired:
        if paired < len(packs):
            raise TutorError("collate: some packs hold pairs (pack_pairs) and some samples "
                             "(pack); batch them apart")
        if attn_implementation not in SHARE_BACKENDS:
            raise TutorError(f"collate: pair packs need one of {', '.join(SHARE_BACKENDS)}; "
                             f"{attn_implementation} cannot let rejected see the shared prompt")
        packs = _renumber_pairs(packs)
    if varlen:
        packs = [_flatten(packs)]
    B, L = len(packs), max(len(p["input_ids"]) for p in packs)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(L).repeat(B, 1)  # (B, L); real part overwritten below
    pair_ids = torch.full((B, L), -1, dtype=torch.long)  # (B, L); kept only for pair packs
    for r, p in enumerate(packs):
        n = len(p["input_ids"])
        input_ids[r, :n] = torch.tensor(p["input_ids"])
        labels[r, :n] = torch.tensor(p["labels"])
        position_ids[r, :n] = torch.tensor(p["position_ids"])
        position_ids[r, n:] -= n  # the padding tail counts from 0: a block of its own
        if paired:
            pair_ids[r, :n] = torch.tensor(p["pair_ids"])
    starts = span_starts(position_ids)  # (B, L) first token of each sample (and padding)
    labels[starts] = IGNORE_INDEX  # never a target for the previous sample's last token
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if paired:
        batch["pair_ids"] = pair_ids
    if attn_implementation in MASK_BACKENDS:
        batch["attention_mask"] = _block_mask(position_ids)
        if attn_implementation == "eager":
            dtype = mask_dtype or torch.float32
            zero = torch.zeros((), dtype=dtype)
            batch["attention_mask"] = torch.where(batch["attention_mask"], zero,
                                                  torch.finfo(dtype).min)
    return batch


def _renumber_pairs(packs: Sequence[Pack]) -> list[Pack]:
    """Pair packs with batch-wide pair ids: pair k of the batch (in pack order) → 2k, 2k+1."""
    out, offset = [], 0
    for p in packs:
        out.append({**p, "pair_ids": [offset + x for x in p["pair_ids"]]})
        offset += 2 * (max(p["pair_ids"]) // 2 + 1)
    return out


def _block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: causal inside each span, and a span that
    continues a shared prefix (first position p > 0) also sees the first p tokens of the
    latest span that began at position 0 (`tutor.attention.span_index`)."""
    import torch

    L = position_ids.shape[1]
    index = torch.arange(L).expand_as(position_ids)  # (B, L)
    span_start, root = span_index(position_ids)  # (B, L) each: names each span, its root
    prefix = position_ids.gather(-1, span_start).masked_fill(span_start == root, 0)  # (B, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    own = (span_start[:, :, None] == span_start[:, None, :]) & causal  # (B, L, L)
    keys = index[:, None, :]  # (B, 1, L)
    shared = (keys >= root[:, :, None]) & (keys < (root + prefix)[:, :, None])
    return (own | shared)[:, None]  # (B, 1, L, L): one mask shared by all heads


def _flatten(packs: Sequence[Pack]) -> Pack:
    """All packs as one long pack (the flash-attention varlen layout)."""
    keys = ("input_ids", "labels", "position_ids") + (("pair_ids",) if "pair_ids" in packs[0]
                                                     else ())
    return {k: [x for p in packs for x in p[k]] for k in keys}


@dataclass
class PackCollator:
    """`collate` as a Trainer data_collator: one backend, pad id and mask dtype, set once.

    With ``keep_logits=True`` it also hands the model the positions whose logits the loss
    needs. A causal LM predicts token t+1 at position t; only positions whose *next* label is
    trained enter the loss. Their indices (union over the batch rows) go to the model as
    ``logits_to_keep`` and the matching targets as ``shift_labels``, so the vocab projection
    and the fp32 cross-entropy run on those rows only. Positions dropped are all -100
    targets, which the mean ignores anyway: the loss is unchanged (tests/test_train.py).

    Each batch's token counts (real tokens, tokens with a target) are handed to `on_batch`
    when set (the throughput callback listens there).
    """

    attn_implementation: str = "sdpa"
    pad_token_id: int = 0
    mask_dtype: torch.dtype | None = None
    keep_logits: bool = False
    on_batch: Callable[[tuple[int, int]], None] | None = field(default=None, repr=False)

    def __call__(self, packs: Sequence[Pack]) -> dict[str, torch.Tensor]:
        batch = collate(packs, self.attn_implementation, self.pad_token_id, self.mask_dtype)
        targets = batch["labels"][:, 1:]  # (B, L-1): target of position t is label t+1
        if self.on_batch is not None:
            real = sum(len(p["input_ids"]) for p in packs)
            self.on_batch((real, int((targets != IGNORE_INDEX).sum())))
        if self.keep_logits:
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,) positions
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = targets[:, keep]  # (B, K)
        return batch


def collator_for(model: Any, pad_token_id: int = 0, keep_logits: bool = False) -> PackCollator:
    """A `PackCollator` set up for `model`'s attention backend and dtype."""
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return PackCollator(impl, pad_token_id, model.dtype, keep_logits)


class PackedDataset:
    """A map-style dataset of packs for ``transformers.Trainer``, re-packed each epoch.

    Trainer (through accelerate) calls ``set_epoch(epoch)`` before every epoch; with
    ``reshuffle=True`` the samples are re-packed with seed ``seed + epoch``, so packs
    change between epochs while any run stays reproducible. Use with
    ``data_collator=collate`` (SDPA) or ``collator_for(model)``.

    Trainer's ``remove_unused_columns`` drops ``indices`` but keeps ``position_ids``,
    which is all `collate` needs to find the samples.

    Not handled: with ``strategy="greedy"`` the number of packs may change between epochs
    while Trainer sizes its schedule from epoch 0 (bfd's count depends only on the
    lengths); ``persistent_workers=True`` keeps workers' copies of epoch 0's packs.
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        max_length: int,
        strategy: str = "bfd",
        overflow: str = "truncate",
        seed: int = 0,
        reshuffle: bool = True,
        share_prefix: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.max_length, self.strategy, self.overflow = max_length, strategy, overflow
        self.seed, self.reshuffle, self.share_prefix = seed, reshuffle, share_prefix
        self.epoch = 0
        self.packs = self._pack(seed)

    def _pack(self, seed: int) -> Packs:
        return pack(self.samples, self.max_length, self.strategy, self.overflow, seed,
                    self.share_prefix)

    def set_epoch(self, epoch: int) -> None:
        """Re-pack for `epoch` (a no-op when ``reshuffle`` is False)."""
        self.epoch = epoch
        if self.reshuffle:
            self.packs = self._pack(self.seed + epoch)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> Pack:
        return self.packs[i]
