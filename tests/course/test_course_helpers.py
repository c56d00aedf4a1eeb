"""The course's measuring helpers: parameters by kind (notebook 00) and LoRA's scale (notebook 04).

Tiny models built here; every expected number is worked out by hand from the shapes or the
optimizer's arithmetic, and the scale factors are checked against peft's own.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tutor.course.lora_scale import lora_scale, update_size
from tutor.course.weights import by_kind, kind_of

V, H, INTER, LAYERS, HEADS, KV_HEADS = 96, 32, 48, 2, 4, 2
KV = H // HEADS * KV_HEADS  # width of the k and v projections (grouped-query attention)
EXPECTED = {  # numbers per kind, from the shapes
    "embeddings": V * H,
    "attention": LAYERS * (H * H + H * KV + H * KV + H * H),  # q, k, v, o; no biases
    "MLP": LAYERS * 3 * H * INTER,  # gate, up, down
    "norms": LAYERS * 2 * H + H,  # two per block, one final
}


def tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(("name", "kind"), [
    ("model.embed_tokens.weight", "embeddings"),
    ("model.layers.3.self_attn.k_proj.weight", "attention"),
    ("model.layers.3.mlp.down_proj.weight", "MLP"),
    ("model.layers.3.input_layernorm.weight", "norms"),
    ("model.layers.3.post_attention_layernorm.weight", "norms"),
    ("model.norm.weight", "norms"),
    ("lm_head.weight", "other"),
    ("model.layers.0.attention.wqkv.weight", "other"),  # InternLM2's names: not handled
])
def test_kind_of(name: str, kind: str) -> None:
    assert kind_of(name) == kind


def test_by_kind_tied_counts_the_shared_head_once() -> None:
    model = tiny(tied=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    kinds = by_kind(model)
    assert kinds == {k: (n, 4 * n) for k, n in EXPECTED.items()}  # fp32: 4 bytes each
    assert sum(n for n, _ in kinds.values()) == model.num_parameters()


def test_by_kind_untied_head_is_other() -> None:
    kinds = by_kind(tiny(tied=False))
    assert kinds == {**{k: (n, 4 * n) for k, n in EXPECTED.items()}, "other": (V * H, 4 * V * H)}


def test_by_kind_bytes_follow_each_tensor_dtype() -> None:
    """bf16 halves every kind; norms kept in fp32 (as mixed precision does) keep 4 bytes."""
    model = tiny(tied=True).to(torch.bfloat16)
    assert by_kind(model) == {k: (n, 2 * n) for k, n in EXPECTED.items()}
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.float()
    kinds = by_kind(model)
    assert kinds["norms"] == (EXPECTED["norms"], 4 * EXPECTED["norms"])
    assert sum(b for _, b in kinds.values()) == sum(
        p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize(("alpha", "r", "rslora", "scale"), [
    (16, 64, False, 0.25),  # XTuner's recipes
    (16, 8, False, 2.0),  # the course's
    (32, 4, False, 8.0),  # exercise 06.1's
    (16, 64, True, 2.0),  # rsLoRA: 16 / 8
    (16, 4, True, 8.0),
    (16, 256, True, 1.0),
])
def test_lora_scale_hand_worked(alpha: float, r: int, rslora: bool, scale: float) -> None:
    assert lora_scale(alpha, r, rslora) == scale


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [4, 8, 64])
def test_lora_scale_is_peft_scaling(r: int, rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(16, 16)

    peft_model = get_peft_model(Block(), LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj"],
                                                    use_rslora=rslora))
    peft_scale = peft_model.base_model.model.q_proj.scaling["default"]
    assert lora_scale(16, r, rslora) == pytest.approx(peft_scale, rel=1e-12)


def random_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 16, generator=g), torch.randn(8, 16, generator=g)  # x (N, in), ΔW


def test_update_size_starts_at_zero() -> None:
    """B starts at zero: no step, no update, whatever the scale."""
    x, delta = random_problem()
    assert update_size(x, delta, r=4, scale=8.0, steps=0) == 0.0


def test_update_size_first_step_is_linear_in_scale_and_lr() -> None:
    """Adam's first step moves each entry of B by lr * g / (|g| + eps) ~ ±lr, whatever the
    gradient's size, and A not at all (its gradient is zero while B is): so after one step the
    update is scale * lr * sign(G_B) @ A, proportional to the scale and to the learning rate.
    That is why α/r shrinks the first steps of high ranks and α/√r shrinks them less."""
    x, delta = random_problem()
    one = update_size(x, delta, r=4, scale=1.0, steps=1)
    assert update_size(x, delta, r=4, scale=4.0, steps=1) / one == pytest.approx(4, rel=1e-5)
    assert update_size(x, delta, r=4, scale=1.0, steps=1, lr=3e-4) / one == pytest.approx(
        3, rel=1e-5)


@pytest.mark.parametrize(("r", "expected"), [(1, 3 / math.sqrt(10)), (2, 1.0)])
def test_update_size_converges_to_best_rank_r_fit(r: int, expected: float) -> None:
    """x = I, ΔW = diag(3, 1): the best rank-1 fit is diag(3, 0) (Eckart-Young), so
    |update| / |ΔW| -> 3 / sqrt(10) = 0.9487; rank 2 recovers ΔW itself -> 1."""
    delta = torch.diag(torch.tensor([3.0, 1.0]))
    for seed in (0, 1):
        size = update_size(torch.eye(2), delta, r=r, scale=1.0, steps=1000, lr=3e-2, seed=seed)
        assert size == pytest.approx(expected, abs=1e-5)
