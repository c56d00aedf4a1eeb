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

`attention_cost` measures one real transformers attention layer (the bundled model's shape by
default) on this machine: forward + backward, the peak of live tensor bytes (tutor.measure's
op-by-op tracker) and wall time. flash-attn needs a CUDA GPU, so it is not measured here.
`sdpa_varlen` is what `tutor train` picks on machines without flash-attn (training only gains:
generation, with its KV cache, falls back to plain SDPA).

Not handled: kernels' private workspaces (not tensors, so not counted), KV caches, the
backends' numerical differences, flex attention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tutor.errors import TutorError

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

SDPA_VARLEN = "sdpa_varlen"  # the name `register` gives tutor's backend in transformers
# case -> (attn_implementation, whether it gets collate's block mask for packed samples)
CASES = {"eager + block mask": ("eager", True), "sdpa + block mask": ("sdpa", True),
         "sdpa_varlen (tutor)": (SDPA_VARLEN, False),
         "sdpa, causal only": ("sdpa", False)}  # causal only: one sample per row, no mask


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


@dataclass(frozen=True)
class AttentionCost:
    case: str
    seq_len: int
    peak_bytes: int  # live tensor bytes created during forward + backward of the layer
    mask_bytes: int  # the mask handed in (built by tutor.packing.collate)
    seconds: float


def attention_cost(case: str, seq_len: int, samples: int = 4, config: Any = None,
                   threads: int = 1) -> AttentionCost:
    """Forward + backward of one LlamaAttention layer on a packed row of `seq_len` tokens.

    The row holds `samples` equal samples and, for the "+ block mask" cases, gets the mask
    `tutor.packing.collate` builds for that backend; "sdpa_varlen (tutor)" gets the samples'
    restarted position_ids instead; "sdpa, causal only" is the baseline (the whole row one
    causal sequence, what one sample per row costs).
    `config` is a LlamaConfig (default: the bundled SmolLM2-135M's, 9 query heads, 3 key/value
    heads of 64). Weights are random: cost does not depend on them. Timed on `threads`
    threads (1 by default: comparable on a busy machine).
    """
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from tutor.measure import peak_tracker
    from tutor.models import ensure_bundled
    from tutor.packing import collate, pack

    if case not in CASES:
        raise TutorError(f"case must be one of {'; '.join(CASES)}, not {case!r}")
    if seq_len < samples or samples < 1:
        raise TutorError(f"need 1 <= samples <= seq_len (got {samples}, {seq_len})")
    config = config or LlamaConfig.from_pretrained(ensure_bundled())
    impl, masked = CASES[case]
    if impl == SDPA_VARLEN:
        register()
    config._attn_implementation = impl
    lengths = [seq_len // samples + (i < seq_len % samples) for i in range(samples)]
    row = pack([{"input_ids": [7] * n, "labels": [7] * n} for n in lengths], seq_len)
    batch = collate(row.packs, impl)
    mask = batch["attention_mask"] if masked else None
    torch.manual_seed(0)
    layer = LlamaAttention(config, layer_idx=0)
    x = torch.randn(1, seq_len, config.hidden_size, requires_grad=True)  # (B, L, hidden)
    rope = LlamaRotaryEmbedding(config)(x, batch["position_ids"])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tracker = peak_tracker()
        start = time.perf_counter()
        with tracker:
            out, _ = layer(x, rope, mask, position_ids=batch["position_ids"])
            out.sum().backward()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old)
    mask_bytes = 0 if mask is None else mask.numel() * mask.element_size()
    return AttentionCost(case, seq_len, tracker.peak, mask_bytes, seconds)


def plot_attention_costs(costs: Sequence[AttentionCost]) -> Figure:
    """Peak memory and time against sequence length, one line per case (log-log)."""
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 3.6))
    for case in dict.fromkeys(c.case for c in costs):
        rows = sorted((c for c in costs if c.case == case), key=lambda c: c.seq_len)
        lens = [c.seq_len for c in rows]
        mem.plot(lens, [c.peak_bytes / 2**20 for c in rows], marker="o", label=case)
        sec.plot(lens, [c.seconds for c in rows], marker="o", label=case)
    for ax, ylabel in ((mem, "peak MiB (forward + backward)"), (sec, "seconds")):
        ax.set(xscale="log", yscale="log", xlabel="tokens in the row", ylabel=ylabel)
        ax.set_xticks(sorted({c.seq_len for c in costs}), [str(n) for n in
                                                           sorted({c.seq_len for c in costs})])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    mem.set_title("one attention layer: memory", fontsize=10)
    sec.set_title("one attention layer: time (this CPU)", fontsize=10)
    mem.legend(fontsize=8)
    fig.tight_layout()
    return fig
