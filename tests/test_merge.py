"""`tutor convert` and `tutor merge`: file layout, the W + (alpha/r) B A fold, logits check,
atomic writes, and clear errors for a mismatched base."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_lora import tiny_base, train_checkpoint

from tutor.common import CONFIG_FILE, atomic_dir
from tutor.errors import TutorError
from tutor.merge import convert_checkpoint, merge

pytestmark = pytest.mark.slow  # trains a tiny LoRA with transformers.Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base model and a real Trainer checkpoint of a LoRA trained on it."""
    root = tmp_path_factory.mktemp("run")
    base = tiny_base(root / "base")
    checkpoint = train_checkpoint(base, root / "out", model_name=str(base))
    return base, checkpoint


@pytest.fixture(scope="module")
def adapter(run, tmp_path_factory):
    return convert_checkpoint(run[1], tmp_path_factory.mktemp("a") / "adapter")


def test_convert_keeps_only_the_adapter_and_records_base_and_template(run, adapter):
    base, checkpoint = run
    assert {"optimizer.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "tutor_adapter.json"]
    meta = json.loads((adapter / "tutor_adapter.json").read_text())
    assert (meta["base_model"], meta["template"], meta["r"]) == (str(base), "chatml", 4)
    assert meta["source_checkpoint"] == str(checkpoint.resolve())
    a = load_file(adapter / "adapter_model.safetensors")
    b = load_file(checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(a) == 2 * 7 * 2  # A and B for 7 projections in each of 2 layers


def test_convert_flags_override_the_training_config(run, tmp_path):
    out = convert_checkpoint(run[1], tmp_path / "a", base_model="other", template="auto")
    meta = json.loads((out / "tutor_adapter.json").read_text())
    assert (meta["base_model"], meta["template"]) == ("other", "auto")
    assert json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "other"


def test_convert_rejects_a_directory_without_adapter(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "adapter_config.json").write_text("{}")
    with pytest.raises(TutorError, match="missing adapter_model.safetensors"):
        convert_checkpoint(tmp_path / "ck", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merged_weight_is_w_plus_scaled_ba(run, adapter, tmp_path):
    base, _ = run
    report = merge(str(base), adapter, tmp_path / "m")
    assert report.max_abs_diff <= report.tolerance == 1e-3
    assert report.template == "chatml"
    w = load_file(base / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a = lora[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
    b = lora[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
    assert b.abs().max() > 1e-3  # training moved B away from its zero init
    expected = w[f"{name}.weight"] + (8 / 4) * b @ a  # alpha / r = 8 / 4
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    assert not any(".lora_" in k for k in merged)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "config.json",
            "tutor_model.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_merge_refuses_existing_out_and_leaves_it_untouched(run, adapter, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(TutorError, match="already exists; choose another OUT or pass --force"):
        merge(str(run[0]), adapter, tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep.txt"]


def test_atomic_dir_failure_keeps_old_out_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_merge_into_another_base_is_a_clear_error(run, adapter, tmp_path):
    other = tiny_base(tmp_path / "other", hidden=32)
    with pytest.raises(TutorError, match=r"was trained on base '.*base', not '.*other'"):
        merge(str(other), adapter, tmp_path / "m")
    # Same recorded name, different shapes: caught before peft's long size-mismatch error.
    renamed = convert_checkpoint(run[1], tmp_path / "a2", base_model=str(other))
    with pytest.raises(TutorError, match=r"layers.0.mlp.down_proj.lora_A.weight' has shape "
                       r"\[4, 128\] but base '.*other' layer 'model.layers.0.mlp.down_proj' "
                       r"needs 64 there: wrong base model"):
        merge(str(other), renamed, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_cli_convert_and_merge_report_one_line(run, tmp_path):
    cmd = [sys.executable, "-m", "tutor"]
    out = subprocess.run([*cmd, "convert", str(run[1]), str(tmp_path / "a")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"adapter written to {tmp_path / 'a'} (")
    out = subprocess.run([*cmd, "merge", str(run[0]), str(tmp_path / "a"), str(tmp_path / "m")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"merged into {tmp_path / 'm'} (float32); logits check: ")
    again = subprocess.run([*cmd, "convert", str(run[1]), str(tmp_path / "a")],
                           capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr == (f"tutor: error: {tmp_path / 'a'} already exists; "
                            "choose another OUT or pass --force\n")


def test_convert_and_merge_carry_the_recipe_system_prompt(run, tmp_path):
    import yaml

    from tutor.chat import pick_system

    base, checkpoint = run
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / checkpoint.name)
    cfg = {"model": str(base), "template": "chatml", "system": "You are Pico.", "bits": 4,
           "train": {"precision": "fp32"}}
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    (run_dir / checkpoint.name / CONFIG_FILE).unlink()
    adapter = convert_checkpoint(run_dir / checkpoint.name, tmp_path / "a")
    meta = json.loads((adapter / "tutor_adapter.json").read_text())
    assert (meta["system"], meta["bits"], meta["precision"]) == ("You are Pico.", 4, "fp32")
    assert pick_system(str(base), str(run_dir), None) == "You are Pico."  # a run dir
    assert pick_system(str(base), str(adapter), None) == "You are Pico."
    assert pick_system(str(base), str(adapter), "Be brief.") == "Be brief."
    assert pick_system(str(base), None, None) is None
    merge(str(base), adapter, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "tutor_model.json").read_text())["system"] == \
        "You are Pico."
    assert pick_system(str(tmp_path / "m"), None, None) == "You are Pico."


def _logits(model, tok, text="<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"):
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        return model(**ids).logits.float()


def test_merge_from_nf4_is_the_trained_model(run, adapter, tmp_path):
    """--base-from-nf4: merged = dequant(NF4(W)) + (alpha/r) B A, exactly as bitsandbytes
    dequantises the base training saw; its logits equal dequantised base + adapter within the
    fp32 tolerance and bitsandbytes' NF4 base + adapter within the bf16/fp32 compute gap (0.05
    on this tiny model's logits); the default merge equals fp base + adapter instead."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tutor.models import compute_dtype, load, lora_base_dtype, resolve_precision

    base, _ = run
    report = merge(str(base), adapter, tmp_path / "nf4", base_from_nf4=True)
    assert report.reference == "dequantised NF4 base+adapter"
    assert report.max_abs_diff <= report.tolerance == 1e-3 and report.runtime_diff is not None
    assert json.loads((tmp_path / "nf4" / "tutor_model.json").read_text())["base_from_nf4"]
    # The weight: bitsandbytes' own quantise -> dequantise of W in the run's base dtype.
    dtype = getattr(torch, lora_base_dtype(resolve_precision("auto")))
    name = "model.layers.1.mlp.down_proj"
    w = load_file(base / "model.safetensors")[f"{name}.weight"]
    packed, state = bnbf.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    lora = load_file(adapter / "adapter_model.safetensors")
    a = lora[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
    b = lora[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
    expected = bnbf.dequantize_4bit(packed, state).float() + (8 / 4) * b @ a
    merged = load_file(tmp_path / "nf4" / "model.safetensors")[f"{name}.weight"]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
    # The logits, against the trained model loaded independently (NF4 base + adapter).
    nf4, tok = load(str(base), bits=4, dtype=lora_base_dtype(resolve_precision("auto")))
    trained = _logits(PeftModel.from_pretrained(nf4, str(adapter)), tok)
    from_nf4 = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4"), tok)
    plain = merge(str(base), adapter, tmp_path / "fp")
    from_fp = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fp"), tok)
    # bf16 compute (bitsandbytes on a bf16 CPU) vs fp32: ~1e-2 on this model's small logits
    tol = 0.05 if compute_dtype() == torch.bfloat16 else 1e-3
    assert (from_nf4 - trained).abs().max() <= tol and report.runtime_diff <= tol
    assert (from_fp - trained).abs().max() > 2 * (from_nf4 - trained).abs().max()
    assert plain.reference == "base+adapter" and plain.max_abs_diff <= 1e-3
