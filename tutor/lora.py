"""LoRA from scratch (for teaching) and the small helpers around peft that the course uses.

LoRA freezes a linear layer's weight W (out, in) and learns a low-rank update instead::

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

B starts at zero, so training starts from exactly the pretrained model; A starts random
(Kaiming-uniform, as in peft) so that the gradient of B is not zero. Only r * (in + out)
numbers per layer are trained instead of in * out. After training the update folds back into
the weight, `W' = W + (alpha / r) * B @ A` (`merge_lora`), and inference costs nothing extra.

`LoRALinear` computes exactly what peft's `lora.Linear` computes (tests/test_lora.py checks
forward outputs and merged weights against peft). Use peft for real training (`peft_config`):
this module exists so that the mechanism is visible in 40 lines.

Not handled: LoRA on embeddings or convolutions, rsLoRA/DoRA/PiSSA variants, several
adapters per layer, and `fan_in_fan_out` (GPT-2 style Conv1D) weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from tutor.errors import TutorError

if TYPE_CHECKING:
    from peft import LoraConfig

# XTuner's QLoRA recipes train every linear layer of the blocks (not lm_head): these are their
# names in Llama-family models (SmolLM2, Llama, Qwen2, Mistral). InternLM2 calls them
# wqkv, wo, w1, w2, w3 — same shapes, merged q/k/v.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update of rank `r`, scaled by alpha / r.

    Input (..., in_features) -> output (..., out_features), like the wrapped layer.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise TutorError(f"LoRA rank r must be >= 1, not {r}")
        self.base = base
        self.base.requires_grad_(False)  # the pretrained weight never changes
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r  # so that changing r does not change the update's scale
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))  # (r, in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # (out, r): update = 0
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's (and nn.Linear's) init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.A), self.B)
        return self.base(x) + update * self.scaling  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha / r) * B @ A, shape (out, in) — rank at most r."""
        return (self.B @ self.A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight is W + (alpha / r) * B @ A (the adapter folded in)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(merge_lora(base.weight, self.A, self.B, self.alpha, self.r))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def merge_lora(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float,
               r: int) -> torch.Tensor:
    """W' = W + (alpha / r) * B @ A for W (out, in), A (r, in), B (out, r); returns a new tensor."""
    if A.shape[0] != r or B.shape[1] != r or weight.shape != (B.shape[0], A.shape[1]):
        raise TutorError(
            f"LoRA shapes do not fit: W {tuple(weight.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, r={r}; need A (r, in) and B (out, r)")
    return weight + (B @ A) * (alpha / r)


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return name.rsplit(".", 1)[-1] in targets  # peft's rule: the module name's last part


def inject_lora(model: nn.Module, r: int, alpha: float, targets: tuple[str, ...] = LLAMA_TARGETS,
                dropout: float = 0.0) -> list[str]:
    """Freeze `model` and wrap every `nn.Linear` named like one of `targets` in `LoRALinear`.

    Returns the wrapped modules' names (in `named_modules` order). Raises when nothing matched,
    which almost always means the target names are those of another architecture.
    """
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise TutorError(f"no nn.Linear named {', '.join(targets)} in {type(model).__name__}; "
                         "pass the target module names of this architecture")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return names


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` in `model` by its merged `nn.Linear`, in place; returns model."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).merged())
    return model


def copy_from_peft(model: nn.Module, peft_model: nn.Module) -> int:
    """Copy peft's lora_A / lora_B weights into the same-named `LoRALinear`s of `model`.

    Module names are matched after removing peft's prefix (base_model.model.) and its
    `.base_layer` suffix. Returns how many layers were copied; raises if one has no twin.
    """
    ours = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    copied = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.")
        if key not in ours:
            raise TutorError(f"peft layer '{key}' has no LoRALinear twin in {type(model).__name__}")
        with torch.no_grad():
            ours[key].A.copy_(module.lora_A["default"].weight)
            ours[key].B.copy_(module.lora_B["default"].weight)
        copied += 1
    return copied


def low_rank_error(matrix: torch.Tensor, ranks: list[int]) -> list[float]:
    """Relative Frobenius error of the best rank-k approximation of `matrix`, for each k.

    Eckart-Young: the best rank-k matrix keeps the k largest singular values, so the error is
    sqrt(sum of the other s_i^2) / sqrt(sum of all s_i^2). 0 = exact, 1 = nothing captured.
    """
    s2 = torch.linalg.svdvals(matrix.detach().double()) ** 2  # descending
    total = s2.sum()
    return [float((s2[k:].sum() / total).sqrt()) for k in ranks]


def lora_param_count(shapes: list[tuple[int, int]], r: int) -> int:
    """Trainable numbers of LoRA on linears of shapes [(in, out), ...]: r * (in + out) each."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


def target_shapes(model: nn.Module,
                  targets: tuple[str, ...] = LLAMA_TARGETS) -> list[tuple[int, int]]:
    """(in_features, out_features) of every `nn.Linear` in `model` that LoRA would wrap."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and _matches(n, targets)]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as peft's `print_trainable_parameters` reports."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class _MaskDropout(torch.autograd.Function):
    """Dropout whose backward reuses a bool keep-mask: (x, p) -> x * keep / (1 - p)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def keep_mask(shape: torch.Size | tuple[int, ...], p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - p (to within 2**-31).

    One int64 draw of the generator gives two 31-bit numbers (the sign bit of each half is
    masked off): half the draws of a 32-bit-per-element sampler, and cheaper than torch's
    CPU `bernoulli_` (bench/train_profile.py shows both in a training step). Kept iff the
    number is >= round(p * 2**31). Uses torch's default generator for `device` (seeded by set_seed).
    """
    n = math.prod(shape)
    draws = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_()
    bits = draws.view(torch.int32)[:n].bitwise_and_(0x7FFFFFFF)
    return (bits >= round(p * 2**31)).view(shape)


class LoRADropout(nn.Module):
    """Drop-in for the `nn.Dropout` of peft's LoRA layers: same keep rate 1 - p and scaling
    1 / (1 - p), cheaper on a CPU; identity in eval mode.

    peft drops every adapted layer's input (tokens, in) before its A projection: seven masks
    per Llama block and step. torch's CPU dropout draws each mask with `bernoulli_`, a float
    per element that autograd then keeps for backward; in issue 19's profile (Zen 4, bf16)
    those draws were 18.5 % of a training step. Here the mask comes from `keep_mask` and is
    kept as bool (1 byte per element instead of 4). Same distribution as `nn.Dropout`
    (independent keeps), not the same random numbers: a run with it is not bit-identical
    to one with peft's dropout. On a GPU torch's fused dropout is already cheap: not used there.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise TutorError(f"lora.dropout must be in [0, 1), not {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _MaskDropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_lora_dropout(model: nn.Module) -> int:
    """Replace the `nn.Dropout` of every peft LoRA layer in `model` by `LoRADropout` with the
    same p, in place. Returns how many were replaced (p = 0 layers hold nn.Identity: none)."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if isinstance(layer, nn.Dropout):
                dropouts[name] = LoRADropout(layer.p)
                replaced += 1
    return replaced


def peft_config(r: int = 64, alpha: float = 16, dropout: float = 0.1,
                targets: tuple[str, ...] = LLAMA_TARGETS) -> LoraConfig:
    """peft's `LoraConfig` for a causal LM with XTuner's QLoRA defaults (r 64, alpha 16, p 0.1)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      bias="none", task_type="CAUSAL_LM")
