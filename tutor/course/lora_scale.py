"""How large a LoRA update gets under a given scale, rank and optimizer (notebook 04, 3b).

`update_size` fits one `tutor.lora.LoRALinear` to a target change of a layer's outputs with
AdamW and returns ‖scale·B·A‖ / ‖ΔW‖ — the size of the update it learned, relative to the full
update it imitates. Comparing ranks at one learning rate shows what α/r and rsLoRA's α/√r do;
`lora_scale` gives either factor, as peft computes it (tests/course/test_course_helpers.py).

Not handled: dropout, weight decay, other optimizers, and fitting anything but a mean squared
error on the given inputs.
"""

from __future__ import annotations

import math

import torch

from tutor.lora import LoRALinear


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor LoRA multiplies B @ A by: alpha / r, or rsLoRA's alpha / sqrt(r).

    alpha 16: r=64 -> 0.25 (XTuner's recipes), r=8 -> 2 (the course's); rsLoRA r=64 -> 2.
    rsLoRA (Kalajdzievski, 2023) is peft's `use_rslora=True`.
    """
    return alpha / math.sqrt(r) if rslora else alpha / r


def update_size(x: torch.Tensor, delta: torch.Tensor, r: int, scale: float, steps: int,
                lr: float = 1e-4, alpha: float = 16.0, seed: int = 0) -> float:
    """|scale * B @ A| / |delta| after `steps` AdamW steps fitting x @ delta.T.

    x: (N, in) the layer's inputs; delta: (out, in) the full update to imitate. The same
    `seed` gives the same A for every scale of one rank.
    """
    torch.manual_seed(seed)
    lora = LoRALinear(torch.nn.Linear(delta.shape[1], delta.shape[0], bias=False), r=r,
                      alpha=alpha)
    lora.scaling = scale  # overrides alpha / r
    target = x @ delta.T  # (N, out): what the full update adds to the layer's output
    opt = torch.optim.AdamW([lora.A, lora.B], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        (x @ lora.delta_weight().T - target).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return (lora.delta_weight().norm() / delta.norm()).item()
