"""Where a model's numbers sit: its parameters grouped by kind (notebook 00).

`by_kind(model)` sorts every parameter by its name into embeddings, attention, MLP or norms
(Llama-family names: `embed_tokens`, `self_attn.*`, `mlp.*`, `*norm*`) and adds up numbers
and bytes. A tied output head is the embedding's tensor, so `parameters()` yields it once
and it is counted once.

Not handled: other naming schemes (they land in "other"), buffers, and bitsandbytes' quant
state (block constants kept outside the parameters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

KINDS = (("embed", "embeddings"), ("self_attn", "attention"), ("mlp", "MLP"), ("norm", "norms"))


def kind_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'MLP'; a name matching no kind -> 'other'."""
    return next((label for part, label in KINDS if part in name), "other")


def by_kind(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{kind: (numbers, bytes)} over `model.named_parameters()`, in the dtype they are held."""
    totals: dict[str, tuple[int, int]] = {}
    for name, p in model.named_parameters():
        numbers, size = totals.get(kind_of(name), (0, 0))
        totals[kind_of(name)] = (numbers + p.numel(), size + p.numel() * p.element_size())
    return totals
