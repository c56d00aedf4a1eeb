"""Fault injection: what a hostile but realistic user does, and the one line each one gets.

Each case runs the real `tutor` command in a subprocess, as a user would, and asserts the
exit status, the exact line on stderr, and that nothing was written or left behind.
Elsewhere: a launcher timeout or Ctrl-C leaves no rank alive (tests/test_launch.py), Ctrl-C
at the chat prompt (tests/test_chat.py), and bitsandbytes' offline warning on AVX512-BF16
CPUs (tests/test_cli.py, whose `run_offline_bnb` the merge and chat cases here reuse).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import run_offline_bnb
from tiny_lora import tiny_base, train_checkpoint

from tutor.merge import ADAPTER_FILES, convert_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
WEIGHTS = "adapter_model.safetensors"


def tutor(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tutor", *args], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, cwd=ROOT, timeout=600, **kw)


def one_line_error(out: subprocess.CompletedProcess[str], message: str) -> None:
    assert (out.returncode, out.stderr) == (2, f"tutor: error: {message}\n"), out.stderr[-3000:]


def truncate(path: Path, by: int = 100) -> tuple[int, int]:
    """Cut the last `by` bytes off `path` (a copy that stopped early); (old, new) size."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - by)
    return size, size - by


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny base, a real Trainer checkpoint of a LoRA (r=4) on it, and its adapter."""
    root = tmp_path_factory.mktemp("made")
    base = tiny_base(root / "base")
    checkpoint = train_checkpoint(base, root / "out", model_name=str(base))
    return base, checkpoint, convert_checkpoint(checkpoint, root / "adapter")


# ---------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
def test_convert_merge_and_chat_refuse_a_truncated_adapter(made, tmp_path):
    base, checkpoint, adapter = made
    ckpt = shutil.copytree(checkpoint, tmp_path / "checkpoint-2")
    old, new = truncate(ckpt / WEIGHTS)
    damaged = (f"{ckpt / WEIGHTS}: damaged safetensors file (the header needs {old} bytes, "
               f"the file has {new}): truncated")
    one_line_error(tutor("convert", str(ckpt), str(tmp_path / "a")), damaged)
    bad = shutil.copytree(adapter, tmp_path / "adapter")
    truncate(bad / WEIGHTS)
    damaged = damaged.replace(str(ckpt), str(bad))
    one_line_error(run_offline_bnb(tmp_path, "merge", str(base), str(bad), str(tmp_path / "m")),
                   damaged)
    one_line_error(run_offline_bnb(tmp_path, "chat", str(base), "--adapter", str(bad),
                                   "--prompt", "hi"), damaged)
    assert listing(tmp_path) == ["adapter", "bnb-imported", "checkpoint-2"]  # no OUT, no temp


@pytest.mark.slow
def test_adapter_config_whose_r_disagrees_with_the_weights(made, tmp_path):
    base, _, adapter = made
    bad = shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    line = re.compile(
        rf"tutor: error: {re.escape(str(bad))}: adapter_config.json says r=8 but "
        r"'base_model\.model\.model\.layers\.\d\.\w+\.\w+_proj\.lora_[AB]\.weight' has rank 4 "
        r"\(shape \[\d+, \d+\]\): the config does not belong to these weights; restore the "
        r"adapter_config.json saved with them\n")
    for out in (run_offline_bnb(tmp_path, "merge", str(base), str(bad), str(tmp_path / "m")),
                run_offline_bnb(tmp_path, "chat", str(base), "--adapter", str(bad),
                                "--prompt", "hi")):
        assert out.returncode == 2 and line.fullmatch(out.stderr), out.stderr[-3000:]
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_adapter_of_another_base_with_the_same_shapes_warns_in_one_line(made, tmp_path):
    """Also: the reported adapter size counts the adapter files, not a nested checkpoint."""
    base, checkpoint, adapter = made
    other = tiny_base(tmp_path / "other", seed=1)  # same shapes, other weights
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    shutil.copytree(checkpoint, folder / "checkpoint-2")  # e.g. converted into the run dir
    out = tutor("merge", str(other), str(folder), str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == (f"tutor: warning: {folder} was trained on base '{base}', not "
                          f"'{other}'; the shapes fit, so it is used anyway (the result is "
                          "meaningful only on its own base)\n")
    size = sum((folder / name).stat().st_size for name in ADAPTER_FILES)
    assert f"; adapter {size / 2**20:.2f} MiB -> merged " in out.stdout


# ---------------------------------------------------------------- --resume


def recipe(tmp_path: Path, base: Path, **keys) -> Path:
    raw = {"model": str(base), "output_dir": str(tmp_path / "run"),
           "lora": {"r": 4, "alpha": 8},
           "data": {"datasets": [{"path": "data/assistant.jsonl", "weight": 0.25}],
                    "max_length": 192},
           "train": {"max_steps": 4, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0.0,
                     "progress_bar": False},
           "save": {"steps": 2, "total_limit": None}, **keys}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_resume_skips_an_unfinished_checkpoint_and_says_which(made, tmp_path):
    from tutor.train import train
    from tutor.train_config import load_config

    cfg = recipe(tmp_path, made[0])
    train(load_config(cfg))
    run = tmp_path / "run"
    (run / "checkpoint-4" / "trainer_state.json").unlink()  # killed while saving step 4
    out = tutor("train", str(cfg), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from checkpoint-2" in out.stdout.splitlines()
    assert (f"tutor: warning: skipping {run / 'checkpoint-4'}: no trainer_state.json (the "
            "save did not finish)") in out.stderr.splitlines()
    assert "Traceback" not in out.stderr
    assert re.search(r"^rank 0/1 done: 2 steps in \d+ s \(after step 2, now at 4\), ",
                     out.stdout, re.M), out.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]  # each step once

    for step in (2, 4):  # now every checkpoint is damaged: say how to proceed
        truncate(run / f"checkpoint-{step}" / WEIGHTS)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    out = tutor("train", str(cfg), "--resume")
    size = (run / "checkpoint-4" / WEIGHTS).stat().st_size
    one_line_error(out, f"--resume: no finished checkpoint in {run} ({run / 'checkpoint-4'}/"
                   f"{WEIGHTS}: damaged safetensors file (the header needs {size + 100} "
                   f"bytes, the file has {size}): truncated); delete the damaged checkpoint-N "
                   "folders, or start without --resume into a new output_dir")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


# ---------------------------------------------------------------- recipe ranges


@pytest.mark.parametrize(("override", "problem"), [
    ("lora.r=0", "lora.r: must be >= 1, got 0"),
    ("lora.r=eight", "lora.r: expected int, got str ('eight')"),
    ("lora.alpha=0", "lora.alpha: must be > 0, got 0"),
    ("lora.dropout=1.0", "lora.dropout: must be >= 0 and < 1, got 1.0"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.lr=-1e-4", "train.lr: must be > 0, got -0.0001"),
    ("data.max_length=1", "data.max_length: must be >= 2 (an input and a target; the template "
                          "needs more, checked with the tokenizer), got 1"),
])
def test_out_of_range_settings_blame_the_flag_and_write_nothing(tmp_path, override, problem):
    cfg = recipe(tmp_path, Path("smollm2-135m-instruct"))  # never loaded: fails before
    one_line_error(tutor("train", str(cfg), "--set", override), f"--set {override}: {problem}")
    assert listing(tmp_path) == ["recipe.yaml"]  # no output_dir, no tutor_config.yaml


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    cfg = recipe(tmp_path, Path("smollm2-135m-instruct"), lora={"r": "eight"})
    one_line_error(tutor("train", str(cfg), "--set", "train.lr=1e-3"),
                   f"{cfg}: lora.r: expected int, got str ('eight')")


@pytest.mark.slow
def test_max_length_too_short_for_the_template(made, tmp_path):
    cfg = recipe(tmp_path, made[0], template="chatml")
    out = tutor("train", str(cfg), "--set", "data.max_length=8")
    assert out.returncode == 2 and re.fullmatch(
        r"tutor: error: data\.max_length: 8 tokens cannot hold even a one-token exchange in "
        r"the 'chatml' template \(1\d tokens\); raise it \(recipes use 512 or more\)\n",
        out.stderr), out.stderr[-3000:]
    assert listing(tmp_path) == ["recipe.yaml"]


# ---------------------------------------------------------------- data files


QA = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Capital of France?",
                                                   "answer": "Paris"}]
AS_TEXT = {
    ".csv": "question,answer\r\n" + "".join(f'"{r["question"]}",{r["answer"]}\r\n' for r in QA),
    ".jsonl": "".join(json.dumps(r) + "\n" for r in QA),
    ".json": json.dumps(QA, indent=1),
}


@pytest.mark.parametrize("suffix", sorted(AS_TEXT))
def test_utf8_with_a_bom_reads_like_utf8(tmp_path, suffix):
    """Excel's "CSV UTF-8" (and some editors) start the file with a byte-order mark."""
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(AS_TEXT[suffix], encoding="utf-8")
    bom.write_bytes(codecs.BOM_UTF8 + AS_TEXT[suffix].encode())
    for src in (plain, bom):
        out = tutor("data", "convert", str(src), str(tmp_path / f"{src.stem}.out.jsonl"))
        assert (out.returncode, out.stderr) == (0, ""), out.stderr
        assert out.stdout == f"wrote 2 conversations to {tmp_path / f'{src.stem}.out.jsonl'}\n"
    converted = (tmp_path / "bom.out.jsonl").read_text()
    assert converted == (tmp_path / "plain.out.jsonl").read_text()
    assert json.loads(converted.splitlines()[1])["messages"][1] == {"role": "assistant",
                                                                   "content": "Paris"}


def test_an_empty_file_is_an_error_for_convert_and_show(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")  # blank lines only: no record
    one_line_error(tutor("data", "convert", str(empty), str(tmp_path / "out.jsonl")),
                   f"{empty}: no records")
    one_line_error(tutor("data", "show", str(empty)), f"{empty}: no records")
    assert listing(tmp_path) == ["empty.jsonl"]


def test_convert_refuses_to_overwrite_its_own_input(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(AS_TEXT[".jsonl"])
    one_line_error(tutor("data", "convert", str(data), str(data)),
                   f"{data} is the input file; write the conversion to another path")
    assert data.read_text() == AS_TEXT[".jsonl"] and listing(tmp_path) == ["qa.jsonl"]


# ---------------------------------------------------------------- offline hub


@pytest.mark.parametrize(("name", "hint"), [
    ("Qwen/Qwen2.5-0.5B-Instructt", "use a local directory or the bundled "
                                    "'smollm2-135m-instruct'"),
    ("smollm2-135m-instuct", "did you mean 'smollm2-135m-instruct'?"),
])
def test_an_offline_hub_id_fails_at_once_in_one_line(tmp_path, name, hint):
    """HF_HUB_OFFLINE stands for an unreachable hub, so the test needs no network either
    way; before the fix transformers retried for ~50 s first (timed in the issue report)."""
    out = tutor("chat", name, "--prompt", "hi",
                env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    one_line_error(out, f"'{name}' is no local directory, not in the Hugging Face cache, "
                   f"and the hub cannot be reached (offline); {hint}")


# ---------------------------------------------------------------- the checks themselves


def test_safetensors_checks_name_each_kind_of_damage(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tutor.checkpoints import check_resumable, check_safetensors
    from tutor.errors import TutorError

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, good)
    size = good.stat().st_size
    assert {k: v["shape"] for k, v in check_safetensors(good).items()} == {"a": [2, 3], "b": [4]}
    damaged = f"{good}: damaged safetensors file"
    with good.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(TutorError, match=re.escape(
            f"{damaged} (the header needs {size} bytes, the file has {size + 1}): "
            "has trailing bytes")):
        check_safetensors(good)
    truncate(good, by=good.stat().st_size - 5)
    with pytest.raises(TutorError, match=re.escape(
            f"{damaged} (5 bytes, shorter than its 8-byte header length)")):
        check_safetensors(good)
    good.write_bytes((12).to_bytes(8, "little") + b"not json!!!!")
    with pytest.raises(TutorError, match=re.escape(f"{damaged} (its header is not JSON: ")):
        check_safetensors(good)

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"global_step": 3}')
    torch.save({"x": torch.zeros(3)}, ckpt / "optimizer.pt")
    assert check_resumable(ckpt) == 3
    truncate(ckpt / "optimizer.pt", by=10)
    with pytest.raises(TutorError, match=re.escape(
            f"{ckpt / 'optimizer.pt'}: damaged (not a complete torch archive)")):
        check_resumable(ckpt)
