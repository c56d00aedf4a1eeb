"""LoRA from scratch (tutor.lora) against peft: same outputs, same merged weights, same counts."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tutor.errors import TutorError
from tutor.lora import (
    LoRADropout,
    LoRALinear,
    copy_from_peft,
    inject_lora,
    keep_mask,
    lora_param_count,
    low_rank_error,
    merge_and_unload,
    merge_lora,
    peft_config,
    target_shapes,
    trainable_parameters,
    use_lora_dropout,
)

R, ALPHA = 8, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def twins(dropout: float = 0.0):
    """The same tiny model with peft's LoRA and with ours, sharing identical (random) A and B."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, peft_config(r=R, alpha=ALPHA, dropout=dropout)).eval()
    names = inject_lora(ours, r=R, alpha=ALPHA, dropout=dropout)
    g = torch.Generator().manual_seed(1)
    for name in names:  # B is zero after init: give it real values so the tests can fail
        B = peft_model.base_model.model.get_submodule(name).lora_B["default"].weight
        with torch.no_grad():
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
    assert copy_from_peft(ours, peft_model) == len(names)
    return peft_model, ours.eval(), names


def test_lora_linear_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: the update is exactly zero
    assert layer.A.requires_grad and layer.B.requires_grad and not base.weight.requires_grad
    assert layer.scaling == 2.0 and layer.delta_weight().abs().sum() == 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # eval mode: dropout is the identity
def test_forward_equals_peft(dropout):
    peft_model, ours, names = twins(dropout)
    assert len(names) == 2 * 7
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert (expected - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-3  # LoRA is active
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_merged_weights_equal_peft_merge_and_unload():
    peft_model, ours, names = twins()
    theirs = peft_model.merge_and_unload()
    merge_and_unload(ours)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    ref, got = theirs.state_dict(), ours.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_merge_math_and_rank():
    torch.manual_seed(0)
    W, A, B = torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    merged = merge_lora(W, A, B, alpha=8, r=4)
    torch.testing.assert_close(merged - W, 2.0 * B @ A)
    assert torch.linalg.matrix_rank(merged - W) == 4
    with pytest.raises(TutorError, match="shapes do not fit"):
        merge_lora(W, B, A, alpha=8, r=4)


def test_gradients_flow_only_into_A_and_B():
    _, ours, _ = twins()
    ours.train()
    ids = torch.arange(10).unsqueeze(0)
    ours(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith((".A", ".B")) for n in grads)


def test_parameter_counts_equal_peft():
    peft_model, ours, _ = twins()
    peft_trainable, peft_total = peft_model.get_nb_trainable_parameters()
    assert trainable_parameters(ours) == (peft_trainable, peft_total)
    # and the closed form r * (in + out) per layer, from the base model's shapes
    shapes = target_shapes(tiny_llama())
    assert lora_param_count(shapes, R) == peft_trainable
    # per layer: q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->96, down 96->64
    assert lora_param_count(shapes, R) == 2 * R * (128 + 96 + 96 + 128 + 3 * 160)


def test_bad_targets_and_rank_are_errors():
    with pytest.raises(TutorError, match="no nn.Linear named wqkv"):
        inject_lora(tiny_llama(), r=4, alpha=8, targets=("wqkv",))
    with pytest.raises(TutorError, match="rank r must be >= 1"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)


def test_low_rank_error_follows_eckart_young():
    torch.manual_seed(0)
    rank3 = torch.randn(40, 3) @ torch.randn(3, 30)
    errors = low_rank_error(rank3, [1, 2, 3, 10])
    assert errors[0] > errors[1] > 1e-3 and errors[2] < 1e-7 and errors[3] < 1e-7
    full = torch.randn(30, 30)
    U, S, Vh = torch.linalg.svd(full)
    best2 = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
    assert low_rank_error(full, [2])[0] == pytest.approx(
        float(torch.linalg.norm(full - best2) / torch.linalg.norm(full)), rel=1e-5)


# ------------------------------------------------------------- LoRADropout: a cheaper CPU mask

def test_keep_mask_has_the_keep_rate_of_its_p():
    torch.manual_seed(0)
    n = 2**22
    for p in (0.05, 0.1, 0.5):
        rate = keep_mask((n,), p).float().mean().item()
        assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (p, rate)  # 5 sigma
    assert keep_mask((3, 5), 0.0).all()  # odd sizes: one int64 draw covers two elements
    mask = keep_mask((7, 3), 0.3)
    assert mask.dtype == torch.bool and mask.shape == (7, 3)


def test_keep_mask_is_seeded_by_torch_and_independent_per_call():
    torch.manual_seed(3)
    a, b = keep_mask((4096,), 0.5), keep_mask((4096,), 0.5)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((4096,), 0.5), a)  # set_seed reproduces a run
    assert not torch.equal(a, b)  # each call draws a new mask


def test_lora_dropout_scales_kept_values_and_masks_the_gradient_alike():
    torch.manual_seed(0)
    x = torch.randn(64, 48).add_(3.0).requires_grad_()  # no exact zeros in x
    drop = LoRADropout(0.2).train()
    y = drop(x)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y[kept], x[kept] / 0.8, rtol=1e-6, atol=0)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.8, 0.0), rtol=1e-6, atol=0)
    assert torch.equal(drop.eval()(x), x)  # eval: identity
    with pytest.raises(TutorError, match="lora.dropout"):
        LoRADropout(1.0)


def test_use_lora_dropout_replaces_every_peft_dropout_and_keeps_eval_outputs():
    base = tiny_llama()
    model = get_peft_model(base, peft_config(r=R, alpha=ALPHA, dropout=0.1))
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    model.eval()
    before = model(input_ids=ids).logits
    assert use_lora_dropout(model) == 2 * 7  # 7 adapted linears in each of 2 blocks
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, LoRADropout)} == {0.1}
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    model.train()  # in training the LoRA inputs are now dropped by LoRADropout
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].weight.normal_()  # B = 0 would hide any dropout
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    assert not torch.equal(model(input_ids=ids).logits, a)
