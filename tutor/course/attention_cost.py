"""What attention costs per backend on this machine: one real layer, forward + backward.

`attention_cost` runs one transformers `LlamaAttention` layer (the bundled model's shape by
default) on a packed row, as each backend receives it from `tutor.packing.collate` (see the
table in `tutor.attention`), and measures the peak of live tensor bytes (`tutor.measure`'s
op-by-op tracker) and wall time. flash-attn needs a CUDA GPU, so it is not measured here.
Notebook 09 draws the result with `plot_attention_costs`.

Not handled: kernels' private workspaces (not tensors, so not counted), KV caches, the
backends' numerical differences, flex attention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tutor.attention import SDPA_VARLEN, register
from tutor.errors import TutorError
from tutor.measure import peak_tracker
from tutor.models import ensure_bundled
from tutor.packing import collate, pack

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# case -> (attn_implementation, whether it gets collate's block mask for packed samples)
CASES = {"eager + block mask": ("eager", True), "sdpa + block mask": ("sdpa", True),
         "sdpa_varlen (tutor)": (SDPA_VARLEN, False),
         "sdpa, causal only": ("sdpa", False)}  # causal only: one sample per row, no mask


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
