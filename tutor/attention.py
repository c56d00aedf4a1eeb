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


def sdpa_varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None = None, **kwargs: Any
                          ) -> tuple[torch.Tensor, None]:
    """Causal SDPA on each packed sample's span alone; plain SDPA otherwise.

    query (B, H, L, D), key/value (B, Hkv, L, D), position_ids (B, L) restarting at 0 where
    a sample starts (what `tutor.packing.collate` produces). Returns (B, L, H, D), as every
    transformers attention function does. Equal to SDPA with collate's block mask (within
    kernel rounding, tests/test_attention.py) but it skips the blocks that mask zeroes out.

    Falls back to transformers' `sdpa_attention_forward` when there is a mask (padding),
    no position_ids, or a KV cache (query shorter than key: generation). Not handled: a
    sample that does not start at position 0 (e.g. a pack continuing a truncated sample).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    L = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != L:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b in range(query.shape[0]):
        # .tolist() syncs a GPU; this path is for machines without flash-attn (CPUs)
        starts = sorted({0, *(position_ids[b] == 0).nonzero().flatten().tolist()})
        bounds = [*starts, L]
        spans = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                        value[b:b + 1, :, s:e], None, **kwargs)[0]
                 for s, e in zip(bounds, bounds[1:], strict=False)]  # each (1, n, H, D)
        rows.append(torch.cat(spans, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> str:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
    AttentionMaskInterface.register(SDPA_VARLEN, sdpa_varlen_mask)
    return SDPA_VARLEN
