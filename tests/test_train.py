"""Training: recipe validation, the loss trick, a real tiny run, SIGKILL + resume, ZeRO-2.

Training tests use a random 2-layer Llama (hidden 64) with the bundled tokenizer, so
each optimizer step takes milliseconds; what they check is the machinery (Trainer,
checkpoints, DeepSpeed), not what a 135M model learns (notebook 06 shows that).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_lora import tiny_base

from tutor.common import CONFIG_FILE, IGNORE_INDEX
from tutor.errors import TutorError
from tutor.train_config import (
    TrainConfig,
    config_from_dict,
    list_recipes,
    load_config,
    to_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


MINIMAL = {"model": "m", "output_dir": "out"}


# ---------------------------------------------------------------- config


def test_unknown_key_names_its_path(tmp_path):
    f = write(tmp_path / "c.yaml", {**MINIMAL, "lora": {"r": 8, "rank": 4}})
    with pytest.raises(TutorError, match=r"c\.yaml: lora\.rank: unknown key \(known: r, alpha"):
        load_config(f)


def test_wrong_type_names_its_path(tmp_path):
    f = write(tmp_path / "c.yaml", {**MINIMAL, "lora": {"r": "eight"}})
    with pytest.raises(TutorError, match=r"lora\.r: expected int, got str \('eight'\)"):
        load_config(f)
    with pytest.raises(TutorError, match=r"data\.datasets\[0\]\.weight: expected float, got str"):
        config_from_dict({**MINIMAL, "data": {"datasets": [{"path": "x", "weight": "a"}]}})
    with pytest.raises(TutorError, match=r"train\.precision: expected one of 'auto' \| 'bf16'"):
        config_from_dict({**MINIMAL, "train": {"precision": "bf8"}})
    with pytest.raises(TutorError, match=r"train\.gradient_checkpointing: expected bool, got int"):
        config_from_dict({**MINIMAL, "train": {"gradient_checkpointing": 1}})
    with pytest.raises(TutorError, match=r"^output_dir: required key is missing"):
        config_from_dict({"model": "m"})


def test_overrides_and_yaml_floats(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: m\noutput_dir: out\ntrain:\n  lr: 2e-4\nlora: null\n")
    cfg = load_config(f, ["train.max_steps=7", "lora.r=4", "evaluation.prompts=[a, 'b c']"])
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == 7
    assert cfg.lora is not None and (cfg.lora.r, cfg.lora.alpha) == (4, 16)  # rest: defaults
    assert cfg.evaluation.prompts == ["a", "b c"]
    assert load_config(f).lora is None  # `lora: null` = full fine-tune
    with pytest.raises(TutorError, match=r"train\.epochz: unknown key"):
        load_config(f, ["train.epochz=2"])
    with pytest.raises(TutorError, match=r"expected KEY=VALUE"):
        load_config(f, ["train.epochs"])
    # The resolved config round-trips through YAML unchanged.
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, TrainConfig) and cfg.data.datasets and cfg.output_dir
    if cfg.deepspeed:
        from tutor.train_config import deepspeed_json

        assert Path(deepspeed_json(cfg.deepspeed)).is_file()


def test_recipe_list_covers_the_issue():
    expected = {"smollm2_135m_qlora_assistant", "smollm2_135m_lora_geography",
                "smollm2_135m_pretrain_corpus", "smollm2_135m_dpo_pico",
                "qwen2_5_0_5b_instruct_qlora",
                "internlm2_chat_7b_qlora_oasst1", "llama3_8b_instruct_qlora"}
    names = set(list_recipes())
    assert expected <= names and {f"{n}_deepspeed" for n in expected - {
        "smollm2_135m_qlora_assistant", "smollm2_135m_lora_geography",
        "smollm2_135m_pretrain_corpus", "smollm2_135m_dpo_pico"}} <= names


def test_cli_list_and_copy_cfg(tmp_path, capsys):
    from tutor.cli import main

    assert main(["list-cfg"]) == 0
    out = capsys.readouterr().out
    assert "smollm2_135m_qlora_assistant" in out and "qlora" in out
    assert main(["copy-cfg", "smollm2_135m_lora_geography", str(tmp_path)]) == 0
    copied = tmp_path / "smollm2_135m_lora_geography.yaml"
    assert load_config(copied) == load_config("smollm2_135m_lora_geography")
    assert main(["copy-cfg", "smollm2_135m_lora_geography", str(tmp_path)]) == 2  # exists
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "no recipe file or name" in capsys.readouterr().err


# ---------------------------------------------------------------- the loss trick


def test_logits_only_where_trained_leave_the_loss_unchanged(tmp_path):
    """PackCollator's logits_to_keep/shift_labels give the model's own loss (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tutor.packing import PackCollator, pack

    base = tiny_base(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    samples = [  # three samples, answers of different lengths, prompts never trained
        {"input_ids": [1, 5, 6, 7, 8, 9], "labels": [*[IGNORE_INDEX] * 3, 7, 8, 9]},
        {"input_ids": [1, 10, 11, 12], "labels": [*[IGNORE_INDEX] * 2, 11, 12]},
        {"input_ids": [1, 13, 14, 15, 16], "labels": [*[IGNORE_INDEX] * 4, 16]},
    ]
    packs = pack(samples, max_length=8)  # two packs of different lengths → padding too
    collator = PackCollator("sdpa", pad_token_id=2, keep_logits=True)
    batch = collator(list(packs))
    keep = batch["logits_to_keep"]
    assert keep.tolist() == sorted(set(keep.tolist())) and len(keep) < batch["input_ids"].shape[1]
    with torch.no_grad():
        fast = model(**batch)
        full = model(**{k: v for k, v in batch.items() if k not in ("logits_to_keep",
                                                                     "shift_labels")})
    assert fast.logits.shape[1] == len(keep)
    torch.testing.assert_close(fast.loss, full.loss, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- real runs (tiny model)


def tiny_recipe(tmp_path: Path, **train) -> dict:
    base = tmp_path / "tiny"
    if not base.exists():
        tiny_base(base)
    return {
        "model": str(base),
        "output_dir": str(tmp_path / "run"),
        "lora": {"r": 8, "alpha": 16},
        "data": {"datasets": [{"path": "data/assistant.jsonl", "weight": 0.25}],
                 "max_length": 192},
        "train": {"max_steps": 8, "lr": 2e-2, "precision": "fp32", "warmup_ratio": 0.0,
                  "scheduler": "constant", **train},
        "save": {"steps": 2, "total_limit": 2},
        "evaluation": {"prompts": ["Who are you?"], "max_new_tokens": 4},
    }


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_tiny_run_learns_and_writes_its_artifacts(tmp_path):
    from tutor.train import train

    cfg = config_from_dict(tiny_recipe(tmp_path))
    result = train(cfg)
    out = result.output_dir
    assert result.global_step == 8
    curve = losses(out)
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.2, curve
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png",
                 CONFIG_FILE, f"checkpoint-8/{CONFIG_FILE}",
                 "checkpoint-8/tutor_progress.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint-4").exists()  # total_limit=2 keeps 6 and 8
    saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert saved["model"] == cfg.model and saved["template"] == "auto"
    m = result.metrics
    assert 0 < m["trained_tokens"] < m["all_tokens"] and m["trained_tok_s"] > 0
    assert set(result.answers["Who are you?"]) == {0, 8}  # before and after


KILL_SCRIPT = """
import os, signal, sys
from transformers import TrainerCallback
from tutor.train import train
from tutor.train_config import load_config

class KillAt(TrainerCallback):  # SIGKILL: no cleanup, no final save, like a lost machine
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_config(sys.argv[1]), callbacks=[KillAt()])
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    import torch
    from safetensors.torch import load_file

    from tutor.train import train

    recipe = tiny_recipe(tmp_path, batch_size=2)
    straight = train(config_from_dict({**recipe, "output_dir": str(tmp_path / "straight")}))

    killed_yaml = write(tmp_path / "killed.yaml", {**recipe, "output_dir": str(tmp_path / "k")})
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(killed_yaml)], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "k" / "checkpoint-4").is_dir()
    assert not (tmp_path / "k" / "checkpoint-6").exists()  # it died between saves

    resumed = train(load_config(killed_yaml), resume=True)
    assert resumed.global_step == straight.global_step == 8
    # No lost or repeated data: the same token totals, and the same weights.
    for key in ("trained_tokens", "all_tokens"):
        assert resumed.metrics[key] == straight.metrics[key]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "k" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with pytest.raises(TutorError, match="no checkpoint-N"):
        train(config_from_dict({**recipe, "output_dir": str(tmp_path / "empty")}), resume=True)


@pytest.mark.slow
def test_zero2_on_two_cpu_ranks(tmp_path):
    """Two CPU ranks under ZeRO-2: both finish, the loss falls, and each rank's optimizer
    holds half of the fp32 master + Adam state, as tutor.course.zero estimates for 2 GPUs."""
    from tutor.course.zero import Zero, estimate_zero
    from tutor.launch import run_local
    from tutor.memory import Setup, arch_from_config

    recipe = tiny_recipe(tmp_path, max_steps=6)
    recipe["save"] = {"steps": 0}
    cfg = write(tmp_path / "ds.yaml", recipe)
    result = run_local(cfg, nproc=2, deepspeed="zero2", timeout=900, echo=None)
    assert result.returncode == 0, "\n".join(result.log[-40:])
    assert sorted(result.ranks) == [0, 1], "\n".join(result.log[-40:])
    assert {(r.world, r.steps) for r in result.ranks.values()} == {(2, 6)}
    curve = result.losses
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.1, curve
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    arch = arch_from_config(json.loads((tmp_path / "tiny" / "config.json").read_text()), "tiny")
    setup = Setup(method="lora", lora_r=8, dtype="float32", seq_len=192)
    shard = estimate_zero(arch, setup, Zero(stage=2, gpus=2)).gpu["optimizer state"]
    whole = estimate_zero(arch, setup, Zero(stage=2, gpus=1)).gpu["optimizer state"]
    for r in result.ranks.values():  # up to DeepSpeed's alignment padding and step counters
        assert r.optimizer_bytes == pytest.approx(shard, abs=256), (r, shard)
    assert 2 * shard == pytest.approx(whole, abs=32)


@pytest.mark.slow
def test_qlora_gradients_unchanged_by_the_evaluation_chat(tmp_path):
    """Asking questions mid-training must not leave 4-bit layers in bitsandbytes' CPU
    inference layout (it has no backward): gradients after it equal those before."""
    import torch

    from tutor.callbacks import EvaluateChatCallback
    from tutor.train import build_model

    cfg = config_from_dict({**tiny_recipe(tmp_path), "bits": 4})
    model, tokenizer = build_model(cfg, "bf16")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n}

    before = grads()
    EvaluateChatCallback(cfg, tokenizer)._ask_all(model, 0, is_main=False)
    assert model.training
    packed = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")
              and type(m).__name__ == "Linear4bit"]
    assert packed and not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in packed)
    after = grads()
    for name, g in before.items():
        torch.testing.assert_close(after[name], g, rtol=0, atol=0)


# ---------------------------------------------------------------- memory options (issue 19)


def test_gpu_only_options_are_refused_on_cpu_in_one_line():
    import torch

    from tutor.train import check_device_options, resolve_chunked_loss, training_arguments

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")

    def cfg(**train):
        return config_from_dict({**MINIMAL, "train": train})

    with pytest.raises(TutorError, match=r"^train\.offload_activations: offloads what gradient "
                       r"checkpointing keeps; set train\.gradient_checkpointing=true too$"):
        check_device_options(cfg(offload_activations=True))
    with pytest.raises(TutorError, match=r"^train\.offload_activations: moves checkpointed "
                       r"activations off a CUDA GPU; .*\(set it to false\)$"):
        check_device_options(cfg(offload_activations=True, gradient_checkpointing=True))
    for name in ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"):
        with pytest.raises(TutorError, match=rf"^train\.optim: {name} \(bitsandbytes\) needs a "
                           r"CUDA GPU; on CPU use adamw_torch or leave train\.optim unset$"):
            check_device_options(cfg(optim=name))
    with pytest.raises(TutorError, match=r"^train\.optim: unknown optimizer 'adamw9'"):
        check_device_options(cfg(optim="adamw9"))
    ok = cfg(optim="adamw_torch", chunked_loss=True, loss_chunk_size=64)
    check_device_options(ok)
    assert training_arguments(ok, "fp32").optim == "adamw_torch"
    assert resolve_chunked_loss(ok) == 64
    assert resolve_chunked_loss(cfg(chunked_loss=False)) is None
    with pytest.raises(TutorError, match=r"train\.loss_chunk_size: must be >= 1"):
        cfg(loss_chunk_size=0)
    with pytest.raises(TutorError, match=r"train\.chunked_loss: expected bool \| 'auto'"):
        cfg(chunked_loss="yes")


def test_cli_refuses_a_paged_optimizer_on_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, "-m", "tutor", "train", "smollm2_135m_qlora_assistant",
                          "--set", "train.optim=paged_adamw_8bit", "--set",
                          f"output_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=ENV)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "tutor: error: train.optim: paged_adamw_8bit (bitsandbytes) needs a CUDA GPU; on CPU "
        "use adamw_torch or leave train.optim unset")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_qlora_keeps_the_frozen_base_in_16_bits(tmp_path):
    """peft's prepare_model_for_kbit_training upcasts it to fp32; build_model undoes that."""
    import torch

    from tutor.train import build_model

    cfg = config_from_dict({**tiny_recipe(tmp_path), "bits": 4})
    model, _ = build_model(cfg, "bf16")
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    dtypes = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16, torch.uint8}  # 16-bit + NF4 codes
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.slow
def test_paged_8bit_optimizer_and_offload_train_on_a_gpu(tmp_path):
    """On CUDA: QLoRA with paged 8-bit AdamW, offloaded checkpointing and the chunked loss."""
    from tutor.train import train

    cfg = config_from_dict({**tiny_recipe(tmp_path, optim="paged_adamw_8bit",
                                          gradient_checkpointing=True, offload_activations=True,
                                          chunked_loss=True, loss_chunk_size=32, max_steps=3,
                                          precision="auto"), "bits": 4})
    result = train(cfg)
    assert result.global_step == 3 and result.metrics["optimizer_bytes"] > 0
    curve = losses(result.output_dir)
    assert len(curve) == 3 and all(math.isfinite(x) for x in curve)


def test_recipe_system_opens_every_sample_and_is_saved(tmp_path):
    """`system:` becomes the first turn of every conversation without one (train and
    validation), exactly the template's system turn; conversations with their own system
    turn keep it; the resolved config records it."""
    from tutor.data import load_conversations
    from tutor.models import load_tokenizer
    from tutor.train import load_samples
    from tutor.train_config import resolve_data_path

    tok = load_tokenizer("smollm2-135m-instruct")
    raw = {**MINIMAL, "model": "smollm2-135m-instruct", "system": "You are Pico.",
           "data": {"datasets": [{"path": "data/assistant.jsonl"}], "validation": 0.1}}
    cfg = config_from_dict(raw)
    turn = tok.encode("<|im_start|>system\nYou are Pico.<|im_end|>\n", add_special_tokens=False)
    default = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM",
                         add_special_tokens=False)
    for split in ("train", "validation"):
        samples, _ = load_samples(cfg, tok, split)
        heads = [s["input_ids"][:len(turn)] for s in samples]
        assert all(s["labels"][:len(turn)] == [IGNORE_INDEX] * len(turn) for s in samples)
        pico = sum(h == turn for h in heads)
        assert pico >= len(samples) - 6 and pico > 0, split  # 6 records bring their own
        assert not any(s["input_ids"][:len(default)] == default for s in samples), split
    train, _ = load_samples(cfg, tok)
    own = {m[0]["content"] for m in load_conversations(
        resolve_data_path("data/assistant.jsonl"))["messages"] if m[0]["role"] == "system"}
    theirs = [s for s in train if s["input_ids"][:len(turn)] != turn]
    firsts = {tok.decode(s["input_ids"]).split("<|im_end|>")[0] for s in theirs}
    assert firsts and firsts <= {f"<|im_start|>system\n{text}" for text in own}
    plain, _ = load_samples(config_from_dict({**raw, "system": None}), tok)
    assert all(s["input_ids"][:len(turn)] != turn for s in plain)
    assert sum(s["input_ids"][:len(default)] == default for s in plain) == \
        len(plain) - len(theirs)
    assert yaml.safe_load(to_yaml(cfg))["system"] == "You are Pico."
    assert load_config("smollm2_135m_qlora_assistant").system.startswith("You are Pico")
