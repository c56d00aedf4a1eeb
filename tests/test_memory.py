"""The memory estimator (tutor.memory) against published configs and measured training steps."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tutor.errors import TutorError
from tutor.memory import (
    GIB,
    KNOWN,
    Setup,
    arch_from_config,
    estimate,
    format_table,
    get_arch,
    optimizer_bytes,
    trainable,
)
from tutor.quant import bits_per_param

BUNDLED = "smollm2-135m-instruct"


@pytest.mark.parametrize("name, params", [
    ("internlm2-chat-7b", 7_737_708_544),  # embeddings 758,120,448 + blocks 6,979,588,096
    ("qwen2.5-7b", 7_615_616_512),
    ("llama-3-8b", 8_030_261_248),
    ("llama-2-7b", 6_738_415_616),
    ("mistral-7b", 7_241_732_096),
    ("qwen2.5-0.5b", 494_032_768),
])
def test_parameter_counts_equal_the_published_ones(name, params):
    assert KNOWN[name].num_params() == params


def test_internlm2_config_json_reads_as_the_builtin_entry():
    config = {"model_type": "internlm2", "vocab_size": 92544, "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "bias": False, "tie_word_embeddings": False}
    assert arch_from_config(config, "internlm2-chat-7b") == KNOWN["internlm2-chat-7b"]
    with pytest.raises(TutorError, match="no key 'vocab_size'"):
        arch_from_config({k: v for k, v in config.items() if k != "vocab_size"}, "x")


def test_nf4_weights_cost_4127_bits_per_parameter():
    arch = KNOWN["internlm2-chat-7b"]
    est = estimate(arch, Setup(method="qlora"))
    rope = 2 * 64 * 4
    nf4 = est.rows["weights"] - arch.other_params() * 2 - rope
    assert nf4 * 8 / arch.linear_weights() == pytest.approx(bits_per_param(), abs=1e-3)


def test_the_seed_claim_7b_qlora_fits_in_8_gib_and_what_does_not():
    qlora = Setup(method="qlora", seq_len=2048, batch=1, grad_checkpointing=True, lora_r=64,
                  optimizer="paged_adamw_8bit")
    assert estimate(KNOWN["llama-2-7b"], qlora).fits(8)  # 32k vocabulary
    assert estimate(KNOWN["mistral-7b"], qlora).fits(8)
    internlm2 = estimate(KNOWN["internlm2-chat-7b"], qlora)
    # InternLM2's 92k vocabulary: its logits alone take 2 GiB at 2048 tokens
    assert internlm2.rows["logits"] == 2048 * 92544 * 12 and not internlm2.fits(8)
    assert estimate(KNOWN["internlm2-chat-7b"], Setup(seq_len=1024,
                                                      optimizer="paged_adamw_8bit")).fits(8)
    full = estimate(KNOWN["internlm2-chat-7b"], Setup(method="full"))
    assert full.rows["optimizer state"] > 80 * GIB and full.total > 100 * GIB
    lora16 = estimate(KNOWN["internlm2-chat-7b"], Setup(method="lora"))
    assert lora16.rows["weights"] > 14 * GIB  # bf16 weights alone exceed 8 GiB


def test_checkpointing_trades_activations_for_recompute():
    arch = KNOWN["llama-2-7b"]
    on, off = (estimate(arch, Setup(grad_checkpointing=gc)) for gc in (True, False))
    assert off.rows["activations"] > 10 * on.rows["activations"]
    assert off.rows["recompute"] == 0 and on.rows["recompute"] * 32 < off.rows["activations"]


def test_table_names_every_component_and_the_verdict():
    table = format_table(estimate(KNOWN["internlm2-chat-7b"], Setup(method="full")))
    for word in ("weights", "gradients", "optimizer state", "activations", "logits",
                 "peak total", "does NOT fit in 8 GiB"):
        assert word in table


def test_bad_setup_is_a_tutor_error():
    with pytest.raises(TutorError, match="method must be one of full, lora, qlora"):
        Setup(method="dora")
    with pytest.raises(TutorError, match="optimizer must be one of"):
        Setup(optimizer="sgd")
    with pytest.raises(TutorError, match="must be positive"):
        Setup(seq_len=0)
    with pytest.raises(TutorError, match="not a built-in config"):
        get_arch("no-such-model")


def test_8bit_optimizer_state_equals_bitsandbytes_bytes():
    """bitsandbytes' (Paged)AdamW8bit state on CPU (paging falls back to plain memory there)."""
    import warnings

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tutor.lora import peft_config
    from tutor.measure import tensor_bytes

    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(cfg), peft_config(r=16, alpha=16, dropout=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "paged optimizers are not supported on CPU"
        opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad])
        ids = torch.arange(8).unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    arch = arch_from_config(cfg.to_dict(), "tiny")
    sizes = trainable(arch, Setup(method="lora", lora_r=16))
    assert sorted(sizes) == sorted(p.numel() for p in model.parameters() if p.requires_grad)
    assert min(sizes) < 4096 <= max(sizes)  # both of bitsandbytes' regimes are exercised
    assert tensor_bytes(model, opt)["optimizer state"] == optimizer_bytes(sizes, "paged_adamw_8bit")
    full = LlamaForCausalLM(cfg).parameters()
    assert sorted(trainable(arch, Setup(method="full"))) == sorted(p.numel() for p in full)


# ---- against a real model: exact persistent bytes, peak within 25 % ------------------------


def _train_once(model, batch):
    """A first step creates the optimizer state, as in steady training."""
    from tutor.measure import measure_step

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    return measure_step(model, opt, batch)


def _batch(seq_len):
    ids = torch.randint(0, 49152, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.slow
def test_bundled_arch_from_its_config_counts_its_parameters(bundled):
    model, _ = bundled
    assert get_arch(BUNDLED).num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_lora_fp32_estimate_equals_measured_bytes_and_peak(bundled):
    from peft import get_peft_model

    from tutor.lora import peft_config

    model = get_peft_model(copy.deepcopy(bundled[0]), peft_config(r=8, alpha=16, dropout=0.0))
    setup = Setup(method="lora", seq_len=64, grad_checkpointing=False, lora_r=8, dtype="float32")
    est = estimate(get_arch(BUNDLED), setup)
    assert sum(trainable(get_arch(BUNDLED), setup)) == model.get_nb_trainable_parameters()[0]
    measured = _train_once(model, _batch(setup.seq_len))
    for key in ("weights", "LoRA adapters", "gradients", "optimizer state"):
        assert measured.persistent[key] == est.rows[key], key  # exact, byte for byte
    assert abs(est.total / measured.peak - 1) <= 0.25, (est.total, measured.peak)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 16])
def test_qlora_estimate_equals_measured_bytes_and_peak(tmp_path, chunk):
    """tutor's QLoRA model (tutor.train.build_model: NF4 blocks, 16-bit rest, checkpointing,
    dropout), one step under bf16 autocast as Trainer runs it: peak within 10 %."""
    from tutor.train import build_model
    from tutor.train_config import config_from_dict

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cfg = config_from_dict({"model": BUNDLED, "output_dir": str(tmp_path), "bits": 4,
                            "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
                            "train": {"gradient_checkpointing": True}})
    model, _ = build_model(cfg, "bf16")
    setup = Setup(method="qlora", seq_len=64, lora_r=8, lora_dropout=0.1, dtype="bfloat16",
                  chunked_loss=chunk is not None, loss_chunk=chunk or 256)
    est = estimate(get_arch(BUNDLED), setup)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _measured(model, _batch(setup.seq_len), chunk)
    for key in ("weights", "LoRA adapters", "gradients", "optimizer state"):
        assert measured.persistent[key] == est.rows[key], key
    assert abs(est.total / measured.peak - 1) <= 0.10, (est.total, measured.peak)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tutor", "memory", *args],
                          capture_output=True, text=True)


def test_cli_prints_the_qlora_table_and_why_full_does_not_fit():
    qlora = _cli("internlm2-chat-7b", "--method", "qlora", "--seq-len", "1024",
                 "--optimizer", "paged_adamw_8bit")
    assert qlora.returncode == 0, qlora.stderr
    lines = qlora.stdout.splitlines()
    assert lines[0].startswith("internlm2-chat-7b: 7.74 B params · qlora (NF4 + double quant, "
                               "LoRA r=64 on 160 linears) · seq 1024 x batch 1")
    assert lines[-1] == "fits in 8 GiB"
    full = _cli("internlm2-chat-7b", "--method", "full", "--seq-len", "2048", "--optimizer",
                "adamw")
    rows = {line[:17].strip(): line[17:25].strip() for line in full.stdout.splitlines()[2:-1]}
    assert float(rows["optimizer state"]) > 80 and float(rows["gradients"]) > 14
    assert full.stdout.splitlines()[-1] == "does NOT fit in 8 GiB"


def test_cli_bad_input_is_one_line():
    out = _cli("internlm2-chat-7b", "--seq-len", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == ("tutor: error: seq_len, batch, lora_r and loss_chunk must be "
                                  "positive")


@pytest.mark.slow
def test_full_fp32_estimate_equals_measured_bytes_and_peak(bundled):
    model = copy.deepcopy(bundled[0])
    model.requires_grad_(True)
    setup = Setup(method="full", seq_len=32, grad_checkpointing=False, dtype="float32")
    est = estimate(get_arch(BUNDLED), setup)
    measured = _train_once(model, _batch(setup.seq_len))
    held = measured.persistent
    # tensor_bytes files trainable parameters under "LoRA adapters"; here that is every weight
    assert held["weights"] + held["LoRA adapters"] == est.rows["weights"]
    assert held["gradients"] == est.rows["gradients"]
    assert held["optimizer state"] == est.rows["optimizer state"]
    assert abs(est.total / measured.peak - 1) <= 0.25, (est.total, measured.peak)


# ---- chunked loss, checkpointing, offload (issue 19) -----------------------------------


def test_the_gpu_recipes_use_the_cli_defaults_and_7b_fits_in_8_gib():
    from tutor.memory import GPU_RECIPE
    from tutor.train_config import load_config

    for name in ("internlm2_chat_7b_qlora_oasst1", "llama3_8b_instruct_qlora"):
        cfg = load_config(name)
        t = cfg.train
        assert (cfg.bits, cfg.lora.r, cfg.lora.dropout) == (4, GPU_RECIPE.lora_r,
                                                            GPU_RECIPE.lora_dropout), name
        assert (t.gradient_checkpointing, t.offload_activations, t.chunked_loss,
                t.loss_chunk_size, t.optim) == (True, False, True, GPU_RECIPE.loss_chunk,
                                                GPU_RECIPE.optimizer), name
    assert load_config("internlm2_chat_7b_qlora_oasst1").data.max_length == GPU_RECIPE.seq_len
    est = estimate(KNOWN["internlm2-chat-7b"], GPU_RECIPE)
    assert est.fits(8) and not est.fits(7)
    out = _cli("internlm2-chat-7b", "--method", "qlora", "--seq-len", "2048")
    assert out.returncode == 0, out.stderr
    assert "chunked loss (256 rows) · paged_adamw_8bit" in out.stdout.splitlines()[0]
    assert out.stdout.splitlines()[-1] == "fits in 8 GiB"
    unchunked = _cli("internlm2-chat-7b", "--no-chunked-loss")
    assert unchunked.stdout.splitlines()[-1] == "does NOT fit in 8 GiB"


def test_chunked_loss_and_offload_rows():
    arch = KNOWN["internlm2-chat-7b"]
    plain = estimate(arch, Setup(chunked_loss=False))
    chunked = estimate(arch, Setup(chunked_loss=True, loss_chunk=256))
    assert plain.rows["logits"] == 2048 * 92544 * 12
    assert chunked.rows["logits"] == 256 * 92544 * 8 + 2048 * 4096 * 2
    offload = estimate(arch, Setup(chunked_loss=True, loss_chunk=256, offload=True))
    moved = 32 * 2048 * 4096 * 2  # every block's bf16 input
    assert chunked.rows["activations"] - offload.rows["activations"] == moved
    assert offload.rows["recompute"] - chunked.rows["recompute"] == 2048 * 4096 * 2
    with pytest.raises(TutorError, match="offload needs gradient checkpointing"):
        Setup(offload=True, grad_checkpointing=False)


def test_offload_moves_exactly_the_checkpointed_block_inputs(monkeypatch):
    """transformers' offloaded checkpointing (save_on_cpu around each block) is handed one
    tensor per block, the block's input: the bytes the estimator takes off the device."""
    import transformers.modeling_utils as modeling_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda t: packed.append(t.nbytes) or t, lambda t: t)

    monkeypatch.setattr(modeling_utils, "save_on_cpu", CountingSaveOnCpu)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).train()
    model.activation_checkpointing_enable(offload=True)
    ids = torch.randint(0, 128, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    arch = arch_from_config(cfg.to_dict(), "tiny")
    on, off = (estimate(arch, Setup(method="full", seq_len=16, dtype="float32", offload=o))
               for o in (False, True))
    assert sum(packed) == on.rows["activations"] - off.rows["activations"] == 3 * 16 * 64 * 4


def _measured(model, batch, chunk):
    """measure_step after a first step, with the chunked loss when `chunk` is set."""
    from tutor.chunked_loss import causal_lm_loss
    from tutor.measure import measure_step

    loss_fn = (lambda m, b: causal_lm_loss(m, b, chunk=chunk)) if chunk else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    (loss_fn(model, batch) if loss_fn else model(**batch).loss).backward()
    opt.step()
    return measure_step(model, opt, batch, loss_fn)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [None, 128])
def test_wide_vocabulary_peak_within_10_percent(method, checkpointing, chunk):
    """A 64k vocabulary on a width-64 model: the loss dominates the step, as on 7B models."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tutor.lora import peft_config

    cfg = LlamaConfig(vocab_size=64000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if method == "lora":
        model = get_peft_model(model, peft_config(r=8, alpha=16, dropout=0.0))
    if checkpointing:
        model.activation_checkpointing_enable()
    setup = Setup(method=method, seq_len=512, grad_checkpointing=checkpointing, lora_r=8,
                  dtype="float32", chunked_loss=chunk is not None, loss_chunk=chunk or 1024)
    est = estimate(arch_from_config(cfg.to_dict(), "wide"), setup)
    measured = _measured(model, _batch(512), chunk).peak  # token ids < 49,152 < 64,000
    assert abs(est.total / measured - 1) <= 0.10, (est.total, measured)
    if chunk:
        assert est.rows["logits"] * 3 < estimate(est.arch, Setup(**{
            **setup.__dict__, "chunked_loss": False})).rows["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [None, 64])
def test_bundled_lora_peak_within_10_percent(bundled, checkpointing, chunk):
    from peft import get_peft_model

    from tutor.lora import peft_config

    model = get_peft_model(copy.deepcopy(bundled[0]), peft_config(r=8, alpha=16, dropout=0.0))
    if checkpointing:
        model.activation_checkpointing_enable()
    setup = Setup(method="lora", seq_len=256, grad_checkpointing=checkpointing, lora_r=8,
                  dtype="float32", chunked_loss=chunk is not None, loss_chunk=chunk or 1024)
    est = estimate(get_arch(BUNDLED), setup)
    measured = _measured(model, _batch(setup.seq_len), chunk).peak
    assert abs(est.total / measured - 1) <= 0.10, (est.total, measured)


def test_peak_rss_of_a_child_is_its_own():
    """Benchmarks run each configuration in a child process: its peak must not inherit the
    parent's (ru_maxrss does across fork + exec on Linux)."""
    import subprocess
    import sys

    from tutor.measure import peak_rss_bytes

    ballast = bytearray(400 * 2**20)  # the parent now peaks above 400 MiB
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    child = subprocess.run(
        [sys.executable, "-c", "from tutor.measure import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True, text=True, check=True)
    assert peak_rss_bytes() > 400 * 2**20
    assert int(child.stdout) < 200 * 2**20, int(child.stdout) / 2**20
