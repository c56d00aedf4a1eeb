"""What attention costs per backend, and what a packed batch hands each one.

Packed samples must not see each other (tutor.packing). Each backend is told so differently::

    eager              additive float mask (B, 1, L, L): the (heads, L, L) scores are
                       materialised, softmaxed and kept for backward: O(heads·L²) memory
    sdpa (CPU fallback) bool block mask (B, 1, L, L): the fused kernel keeps no scores, but
                       the mask itself is O(L²) per row (and SDPA makes a float copy of it)
    flash_attention_2  no mask at all: one flattened row whose restarted position_ids become
                       cu_seqlens = [0, n1, n1+n2, ...] (int32, one per sample + 1), and the
                       varlen kernel attends only inside each [cu[i], cu[i+1]) span
    sdpa_varlen        tutor's CPU varlen path (`register`): the flash layout (one flattened
                       row, no mask), and SDPA runs causal on each sample's span alone. No
                       L×L mask, and none of the cross-sample blocks a mask would only
                       zero out are computed: Σ nᵢ² instead of L² work per head

`sdpa_varlen` is what `tutor train` picks on machines without flash-attn (training only gains:
generation, with its KV cache, falls back to plain SDPA). What each backend costs is measured
in the course (`tutor.course.attention_cost`, notebook 09).

Spans and shared prefixes: a span starts where position_ids restart at 0 (a sample) or jump
(position not one more than the previous one). A span starting at position s > 0 is the rest
of a sample whose first s tokens are the *shared prefix* (`tutor.packing.pack` with
``share_prefix``): it attends to the first s tokens of the row's latest span that started at 0,
then causally to itself — what the whole sample would see alone::

    position_ids  0 1 2 3 4 | 3 4 5      the prefix (0 1 2) is stored once; the first
                  └prefix┘                sample continues it (3 4), the second jumps back
                                          to 3 and attends to 0 1 2, then to itself

Flash-attention's varlen kernels take only cu_seqlens, so shared prefixes are for sdpa_varlen
and the masked backends (`tutor.packing.collate` builds their masks from the same spans).

Not handled: KV caches (generation uses plain SDPA), flex attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SDPA_VARLEN = "sdpa_varlen"  # the name `register` gives tutor's backend in transformers


def sdpa_varlen_mask(batch_size: int, q_length: int, kv_length: int, *args: Any,
                     attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """transformers' mask hook for `sdpa_varlen`: no mask where the spans say it all.

    Without padding (`attention_mask` None or all ones) and without a cache offset (a full
    forward, or one decode token) it returns None and `sdpa_varlen_attention` finds the
    samples in `position_ids`. Anything else (left-padded batches, chunked prefill) gets
    SDPA's usual 4-D mask, and the attention falls back to plain SDPA with it.
    """
    from transformers.masking_utils import sdpa_mask

    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and q_length in (kv_length, 1):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask,
                     **kwargs)


def span_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True where a span begins: the first token, position 0, or a position that
    is not one more than the one before (the rest of a sample that continues a shared prefix).
    The one definition of a span; `span_index` and `spans` read it."""
    starts = position_ids == 0
    starts[:, 0] = True
    starts[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def span_index(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(span_start, root)``, each (B, L) long: for every token, the index where its span
    begins, and where the row's latest span that began at position 0 begins (the span whose
    first ``position_ids[span_start]`` tokens a shared-prefix span continues; its own span
    when that began at 0)."""
    import torch

    index = torch.arange(position_ids.shape[1], device=position_ids.device)
    index = index.expand_as(position_ids)  # (B, L)
    span_start = torch.where(span_starts(position_ids), index, 0).cummax(-1).values
    root = torch.where(position_ids == 0, index, 0).cummax(-1).values
    return span_start, root


def spans(positions: list[int]) -> list[tuple[int, int, int]]:
    """``(start, end, root)`` per span of one row's position_ids: the span is
    ``[start, end)``; `root` is where the latest span that began at position 0 starts (its
    first ``positions[start]`` tokens are the prefix this span continues; itself if 0)."""
    import torch

    if not positions:
        return []
    span_start, root = (t[0].tolist() for t in span_index(torch.tensor([positions])))
    bounds = [k for k, s in enumerate(span_start) if s == k]
    return [(start, end, root[start])
            for start, end in zip(bounds, [*bounds[1:], len(positions)], strict=True)]


def sdpa_varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None = None, **kwargs: Any
                          ) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each packed sample's span alone; plain SDPA otherwise.

    query (B, H, L, D), key/value (B, Hkv, L, D), position_ids (B, L) restarting at 0 where
    a sample starts (what `tutor.packing.collate` produces). Returns (B, L, H, D), as every
    transformers attention function does. Equal to SDPA with collate's block mask (within
    kernel rounding, tests/test_attention.py) but it skips the blocks that mask zeroes out.
    A span that continues a shared prefix (see the module docstring) attends to the prefix's
    keys and its own, through a (n, s + n) bool mask: all of the prefix, causal on itself.

    Falls back to transformers' `sdpa_attention_forward` when there is a mask (padding),
    no position_ids, or a KV cache (query shorter than key: generation). Not handled: a
    truncated sample continued in another pack (its span would start at position > 0 and
    be read as continuing the row's prefix).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    L = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != L:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b in range(query.shape[0]):
        positions = position_ids[b].tolist()  # syncs a GPU; this path is for CPUs
        bounds = spans(positions)
        # split, not slices: its backward is one concatenation, where every slice's backward
        # would write into a zero tensor of the whole row
        sizes = [e - s for s, e, _ in bounds]
        qs, ks, vs = (t[b:b + 1].split(sizes, dim=2) for t in (query, key, value))
        chunk = {s: j for j, (s, _, _) in enumerate(bounds)}  # span start -> its chunk
        out = []
        for j, (s, _, root) in enumerate(bounds):
            k, v, mask = ks[j], vs[j], None
            if s != root:  # the shared prefix's keys first, all visible, then causal
                p, r = positions[s], chunk[root]  # the prefix's length, the span holding it
                k = torch.cat([ks[r][:, :, :p], k], dim=2)
                v = torch.cat([vs[r][:, :, :p], v], dim=2)
                # row i sees keys 0 .. p + i: the whole prefix, then itself causally
                mask = torch.ones(sizes[j], p + sizes[j], dtype=torch.bool,
                                  device=query.device).tril(p)[None, None]
            out.append(sdpa_attention_forward(module, qs[j], k, v, mask, **kwargs)[0])
        rows.append(torch.cat(out, dim=1))  # each (1, n, H, D)
    return torch.cat(rows, dim=0), None


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
    AttentionMaskInterface.register(SDPA_VARLEN, sdpa_varlen_mask)
    return SDPA_VARLEN
