"""The chunked cross-entropy (tutor.chunked_loss): equal to the unchunked loss, smaller peak.

Tolerances (fp32 throughout): loss within 1e-6 relative; gradients within 1e-5 relative +
1e-7 absolute (sums over the vocabulary run in a different order, in chunks). Models are
tiny random Llamas built here (vocab 512 or the bundled tokenizer's 49,152 for the Trainer).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tutor.chunked_loss import causal_lm_loss, chunked_ce, chunked_ce_sum, output_head
from tutor.common import IGNORE_INDEX

LOSS = {"rtol": 1e-6, "atol": 0.0}
GRAD = {"rtol": 1e-5, "atol": 1e-7}


def _data(k: int, h: int = 16, v: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(k, h, generator=g, dtype=torch.float64).float()
    weight = torch.randn(v, h, generator=g).mul(0.3)
    target = torch.randint(0, v, (k,), generator=g)
    return hidden, weight, target


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])  # 37 rows: 5 and 16 do not divide it
def test_loss_and_both_gradients_equal_cross_entropy(chunk):
    hidden, weight, target = _data(37)
    target[[0, 3, 36]] = IGNORE_INDEX  # untrained rows: no loss, no gradient
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = chunked_ce(h1, w1, target, chunk=chunk)
    ref = F.cross_entropy(h2 @ w2.T, target, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, ref, **LOSS)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(h1.grad, h2.grad, **GRAD)
    torch.testing.assert_close(w1.grad, w2.grad, **GRAD)
    assert h1.grad[[0, 3, 36]].abs().max() == 0  # ignored rows get exactly no gradient


def test_ignored_rows_change_nothing_and_sum_divides_by_num_items():
    hidden, weight, target = _data(12)
    masked = target.clone()
    masked[5:] = IGNORE_INDEX
    ours = chunked_ce(hidden, weight, masked, chunk=4)
    torch.testing.assert_close(ours, F.cross_entropy(hidden[:5] @ weight.T, target[:5]), **LOSS)
    summed = chunked_ce(hidden, weight, masked, num_items_in_batch=torch.tensor(20), chunk=4)
    torch.testing.assert_close(summed, ours * 5 / 20, **LOSS)
    assert chunked_ce_sum(hidden, weight, target, chunk=5).shape == ()


def test_no_trained_token_is_nan_as_in_transformers_and_gives_zero_gradients():
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, _ = _data(6)
    target = torch.full((6,), IGNORE_INDEX)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = chunked_ce(h1, w1, target, chunk=4)
    ref = ForCausalLMLoss(hidden @ weight.T, None, 97, shift_labels=target)
    assert torch.isnan(ours) and torch.isnan(ref)
    ours.backward()  # the nan is 0/0 of the mean: no gradient flows through it
    assert h1.grad.abs().max() == 0 and w1.grad.abs().max() == 0
    empty = chunked_ce(hidden[:0], weight, target[:0], num_items_in_batch=3)  # K = 0 rows
    assert empty.item() == 0.0  # sum / num_items_in_batch, as transformers gives too


def test_bf16_autocast_matches_the_autocast_projection():
    """Under autocast the projection runs in bf16 like lm_head's, CE in fp32 (1e-2 relative:
    bf16 matmuls accumulate in a different order per chunk)."""
    hidden, weight, target = _data(40, h=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_ce(hidden, weight, target, chunk=7)
        ref = F.cross_entropy((hidden @ weight.T).float(), target)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=0)


def test_no_grad_computes_no_gradient_buffers():
    from tutor.measure import peak_tracker

    hidden, weight, target = _data(64, h=256, v=1024)  # weight: 1 MiB; a chunk's logits 32 KiB
    weight.requires_grad_()
    with torch.no_grad(), (tracker := peak_tracker()):
        chunked_ce(hidden, weight, target, chunk=8)
    assert tracker.peak < weight.numel()  # far below the 4 bytes x numel of an fp32 dW


def test_bad_chunk_is_an_error():
    hidden, weight, target = _data(3)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_ce_sum(hidden, weight, target, chunk=0)


def test_the_loss_peak_is_far_below_the_unchunked_one():
    """Live tensor bytes over forward + backward of the loss alone (tutor.measure)."""
    from tutor.measure import peak_tracker

    k, h, v, chunk = 512, 64, 32000, 64
    hidden, weight, target = _data(k, h, v)

    def peak(loss_fn) -> int:
        x = hidden.clone().requires_grad_()
        with (tracker := peak_tracker()):
            loss_fn(x).backward()
        return tracker.peak

    unchunked = peak(lambda x: F.cross_entropy(x @ weight.T, target))
    chunked = peak(lambda x: chunked_ce(x, weight, target, chunk=chunk))
    assert unchunked >= 2 * k * v * 4  # logits and their log-softmax / gradient, fp32
    # a chunk's logits, softmax/gradient in place, + dh and its scaled copy + small vectors
    assert chunked <= 2 * chunk * v * 4 + 3 * k * h * 4 + 64 * k
    assert chunked * 10 < unchunked


# ---------------------------------------------------------------- through a model


def _tiny_llama(vocab: int = 512, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).float()


def _samples(vocab: int = 512):
    g = torch.Generator().manual_seed(1)
    out = []
    for n, answer in [(9, 4), (6, 2), (11, 6), (5, 1), (7, 3)]:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n - answer) + ids[n - answer:]})
    return out


def _batch(attn: str, vocab: int = 512):
    from tutor.attention import register
    from tutor.packing import PackCollator, pack

    register()
    packs = list(pack(_samples(vocab), max_length=16))
    return PackCollator(attn, pad_token_id=0, keep_logits=True)(packs)


def _padded_batch(vocab: int = 512):
    from tutor.packing import PackCollator
    from tutor.train import single_sample_packs

    return PackCollator("sdpa", pad_token_id=0, keep_logits=True)(
        single_sample_packs(_samples(vocab)))


def _lora(model):
    from peft import get_peft_model

    from tutor.lora import peft_config

    model = get_peft_model(model, peft_config(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # B starts at 0: make it non-zero so A has grads
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _full_batch(batch):
    return {k: v for k, v in batch.items() if k not in ("logits_to_keep", "shift_labels")}


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "padded"])
def test_lora_model_loss_and_adapter_grads_equal_the_models_own(attn):
    from tutor.attention import register

    register()
    model = _lora(_tiny_llama())
    if attn != "padded":
        model.base_model.model.set_attn_implementation(attn)
    batch = _padded_batch() if attn == "padded" else _batch(attn)
    twin = copy.deepcopy(model)
    ours = causal_lm_loss(model, batch, chunk=3)
    kept = twin(**batch).loss  # today's path: logits_to_keep + shift_labels
    full = twin(**_full_batch(batch)).loss  # the model's own loss over every position
    torch.testing.assert_close(ours, kept, **LOSS)
    torch.testing.assert_close(ours, full, **LOSS)
    ours.backward()
    kept.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 7 * 2 and all("lora_" in n for n in grads)  # A, B x 7 x 2 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[name], **GRAD, msg=name)
    assert model.base_model.model.lm_head.__class__.__name__ == "Linear"  # head put back


@pytest.mark.parametrize("tie", [True, False])
def test_full_fine_tuning_lm_head_grad_equals(tie):
    from tutor.attention import register

    register()
    model = _tiny_llama(tie=tie)
    model.set_attn_implementation("sdpa_varlen")
    twin = copy.deepcopy(model)
    batch = _batch("sdpa_varlen")
    ours = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(40), chunk=4)
    ref = twin(**batch, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(ours, ref, **LOSS)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, twin.lm_head.weight.grad, **GRAD)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad,
                               twin.model.layers[0].mlp.up_proj.weight.grad, **GRAD)


def test_without_collator_help_every_position_is_scored():
    model = _tiny_llama()
    batch = _full_batch(_batch("sdpa"))
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch, chunk=5), model(**batch).loss,
                                   **LOSS)


def test_a_head_with_bias_is_refused():
    from tutor.errors import TutorError

    model = _tiny_llama(tie=False)
    model.lm_head = torch.nn.Linear(32, 512, bias=True)
    with pytest.raises(TutorError, match="not a bias-free nn.Linear; set train.chunked_loss"):
        output_head(model)


@pytest.mark.slow
def test_trainer_steps_with_packing_equal_the_unchunked_run(tmp_path, monkeypatch):
    """Two ValidationTrainer runs (LoRA, sdpa_varlen packs, grad accumulation 2, eval):
    same losses, eval losses and adapter weights whether the loss is chunked or not."""
    from transformers import TrainingArguments

    import tutor.trainer
    from tutor.trainer import ValidationTrainer

    calls = []
    real = tutor.trainer.causal_lm_loss
    # patched where the Trainer looks it up (tutor.trainer imports it at module top)
    monkeypatch.setattr(tutor.trainer, "causal_lm_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(chunk):
        from tutor.attention import register
        from tutor.packing import PackCollator, PackedDataset

        register()
        model = _lora(_tiny_llama(vocab=512, seed=3))
        model.base_model.model.set_attn_implementation("sdpa_varlen")
        samples = _samples() * 4
        data = PackedDataset(samples, max_length=24, seed=0, reshuffle=False)
        args = TrainingArguments(output_dir=str(tmp_path / f"c{chunk}"), max_steps=3,
                                 per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True,
                                 logging_steps=1, save_strategy="no", disable_tqdm=True,
                                 eval_strategy="steps", eval_steps=3, label_names=["labels"],
                                 prediction_loss_only=True, seed=0, data_seed=0)
        trainer = ValidationTrainer(model=model, args=args, train_dataset=data,
                                    eval_dataset=data, loss_chunk=chunk,
                                    data_collator=PackCollator("sdpa_varlen", 0,
                                                               keep_logits=True))
        trainer.train()
        logs = trainer.state.log_history
        adapters = {n: p.detach().clone() for n, p in model.named_parameters()
                    if p.requires_grad}
        return ([h["loss"] for h in logs if "loss" in h],
                [h["eval_loss"] for h in logs if "eval_loss" in h], adapters)

    chunked = run(5)
    used = len(calls)
    assert used >= 3 * 2 + 1  # every micro-batch of training and the evaluation
    plain = run(None)
    assert len(calls) == used  # loss_chunk=None: the model's own loss
    assert len(chunked[0]) == 3 and len(chunked[1]) == 1
    assert chunked[0] == pytest.approx(plain[0], rel=1e-5)
    assert chunked[1] == pytest.approx(plain[1], rel=1e-5)
    for name, weight in chunked[2].items():
        torch.testing.assert_close(weight, plain[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_uses_the_chunked_loss_wherever_the_head_allows_it():
    from tutor.errors import TutorError
    from tutor.train import resolve_chunked_loss
    from tutor.train_config import config_from_dict

    def cfg(choice):
        return config_from_dict({"model": "m", "output_dir": "o",
                                 "train": {"chunked_loss": choice, "loss_chunk_size": 96}})

    plain, biased = _tiny_llama(tie=False), _tiny_llama(tie=False)
    biased.lm_head = torch.nn.Linear(32, 512, bias=True)
    assert cfg("auto").train.chunked_loss == "auto"  # the default
    assert config_from_dict({"model": "m", "output_dir": "o"}).train.chunked_loss == "auto"
    assert resolve_chunked_loss(cfg("auto"), _lora(plain)) == 96
    assert resolve_chunked_loss(cfg("auto"), biased) is None  # the model's own loss
    assert resolve_chunked_loss(cfg(False), plain) is None
    with pytest.raises(TutorError, match="not a bias-free nn.Linear"):
        resolve_chunked_loss(cfg(True), biased)
    assert resolve_chunked_loss(cfg("auto"), plain, zero3=True) is None  # lm_head partitioned
    with pytest.raises(TutorError, match="ZeRO-3 partitions lm_head"):
        resolve_chunked_loss(cfg(True), plain, zero3=True)


def test_zero_stage_is_read_from_the_deepspeed_config():
    from types import SimpleNamespace

    from tutor.train import _zero_stage
    from tutor.train_config import deepspeed_json

    assert _zero_stage(SimpleNamespace(deepspeed=None)) == 0
    assert _zero_stage(SimpleNamespace(deepspeed=deepspeed_json("zero2"))) == 2
    assert _zero_stage(SimpleNamespace(deepspeed=deepspeed_json("zero3_offload"))) == 3
    assert _zero_stage(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 3}})) == 3
