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

from tutor.common import CONFIG_FILE
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
    # merge refuses the adapter before it imports peft (so bitsandbytes never loads); chat
    # after peft and bitsandbytes are imported, whose offline warning must not show
    one_line_error(run_offline_bnb(tmp_path, "merge", str(base), str(bad), str(tmp_path / "m"),
                                   imported=False), damaged)
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
    # merge refuses before it imports peft (bitsandbytes never loads), chat after
    for out in (run_offline_bnb(tmp_path, "merge", str(base), str(bad), str(tmp_path / "m"),
                                imported=False),
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


# ---------------------------------------------------------------- run directories


@pytest.fixture
def umask022():
    """Files tutor writes must get the umask's mode (644/755 here), not a temp's 600/700."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def modes(folder: Path) -> dict[str, str]:
    """{relative path: octal permission bits} of `folder` and everything under it."""
    return {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777)
            for p in [folder, *folder.rglob("*")]}


@pytest.mark.slow
def test_a_finished_runs_output_dir_is_refused_then_overwritten(tiny, tmp_path, umask022):
    cfg = recipe(tmp_path, tiny)
    run = tmp_path / "run"
    assert tutor("train", str(cfg)).returncode == 0
    assert {m for name, m in modes(run).items()} == {"0o644", "0o755"}, modes(run)
    assert (run / "checkpoint-4").is_dir() and not (run / ".tutor.lock").exists()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    one_line_error(tutor("train", str(cfg)), f"output_dir: {run} already holds files "
                   "(README.md, adapter_config.json, adapter_model.safetensors, "
                   "chat_template.jinja, ...); pass --resume to continue that run, --overwrite to "
                   "replace it, or choose another output_dir")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written

    out = tutor("train", str(cfg), "--set", "train.max_steps=2", "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    assert listing(run) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                            "chat_template.jinja", "checkpoint-2", "loss.png", "metrics.jsonl",
                            "tokenizer.json", "tokenizer_config.json", "training_args.bin",
                            CONFIG_FILE]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]  # the old run's are gone
    assert [row["step"] for row in rows if "train_runtime" in row] == [2]  # one end-of-run
    assert yaml.safe_load((run / CONFIG_FILE).read_text())["train"]["max_steps"] == 2


@pytest.mark.slow
def test_two_runs_at_once_then_sigterm_says_how_to_resume(tiny, tmp_path):
    """The second run is refused while the first holds the lock (even with --overwrite);
    SIGTERM then ends the first as Ctrl-C does, with the command that resumes it."""
    import signal
    import socket
    import time

    cfg = recipe(tmp_path, tiny, save={"steps": 2, "total_limit": 2})
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tutor", "train", str(cfg), "--set",
                              "train.max_steps=100000"], env=ENV, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint-2").is_dir():  # training, and a checkpoint to resume
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        lock = run / ".tutor.lock"
        busy = (f"output_dir: {run} is in use by another run (pid {first.pid} on "
                f"{socket.gethostname()}, lock {lock}); wait for it to end, or choose another "
                "output_dir")
        one_line_error(tutor("train", str(cfg)), busy)
        one_line_error(tutor("train", str(cfg), "--overwrite"), busy)
        first_row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert first_row["step"] == 1 and lock.read_text().split()[0] == str(first.pid)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, err[-3000:]
    assert err.endswith(f"\ntutor: interrupted; continue with: tutor train {cfg} --set "
                        "train.max_steps=100000 --resume\n"), err[-3000:]
    assert "Traceback" not in err and not lock.exists()


def test_the_resume_hint_without_a_checkpoint(tmp_path):
    import argparse

    from tutor.cli import _resume_hint

    cfg = recipe(tmp_path, Path("smollm2-135m-instruct"))
    (tmp_path / "run").mkdir()  # interrupted before its first checkpoint
    args = argparse.Namespace(config=str(cfg), set=["train.lr=1e-3"])
    assert _resume_hint(args) == (
        f"no checkpoint was saved in {tmp_path / 'run'} yet; start again with: tutor train "
        f"{cfg} --set train.lr=1e-3 --overwrite")


def test_lora_target_modules_that_do_not_exist_fail_before_loading(tiny, tmp_path):
    cfg = recipe(tmp_path, tiny, lora={"r": 4, "alpha": 8,
                                       "target_modules": ["q_proj", "nonexistent_proj"]})
    one_line_error(tutor("train", str(cfg)), (
        f"lora.target_modules: no module of {tiny} is named nonexistent_proj; its Linear "
        "layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj "
        "(or use all-linear)"))
    assert listing(tmp_path) == ["recipe.yaml"]


def test_an_unwritable_output_dir_fails_before_the_model_or_data_load(tmp_path, monkeypatch,
                                                                      capsys):
    import tutor.train
    from tutor.cli import main

    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    real = os.access  # root passes every permission check: answer as for a user
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real(p, mode))
    # patched where train() looks them up (tutor.train imports them at module top)
    for name in ("load_tokenizer", "load"):
        monkeypatch.setattr(tutor.train, name, lambda *a, **k: pytest.fail("loaded"))
    cfg = recipe(tmp_path, Path("smollm2-135m-instruct"), output_dir=str(readonly / "run"))
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err == (f"tutor: error: output_dir: cannot write to {readonly} "
                                       "(permission denied); choose another output_dir\n")


def test_a_mistyped_recipe_key_gets_a_suggestion(tmp_path):
    cfg = recipe(tmp_path, Path("smollm2-135m-instruct"))
    out = tutor("train", str(cfg), "--set", "train.lerning_rate=1e-3")
    assert out.returncode == 2 and out.stderr.startswith(
        "tutor: error: --set train.lerning_rate=1e-3: train.lerning_rate: unknown key; did you "
        "mean train.lr? (known: epochs, max_steps, "), out.stderr
    assert listing(tmp_path) == ["recipe.yaml"]


# ---------------------------------------------------------------- file modes


@pytest.mark.parametrize(("umask", "file", "folder"), [(0o022, 0o644, 0o755),
                                                        (0o027, 0o640, 0o750)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, file, folder):
    from tutor.cli import main
    from tutor.common import atomic_dir, atomic_write

    old = os.umask(umask)
    try:
        text = atomic_write(tmp_path / "a.yaml", "x: 1\n")
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
        assert main(["data", "convert", str(ROOT / "tutor/configs/data/raw_qa.csv"),
                     str(tmp_path / "qa.jsonl")]) == 0
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (text, tmp_path / "qa.jsonl")] == \
        [oct(file)] * 2
    assert modes(tmp_path / "merged") == {".": oct(folder), "config.json": oct(file)}


@pytest.mark.slow
def test_adapter_and_merged_dirs_get_the_umasks_modes(made, tmp_path, umask022):
    base, checkpoint, _ = made
    adapter = convert_checkpoint(checkpoint, tmp_path / "adapter")
    out = tutor("merge", str(base), str(adapter), str(tmp_path / "merged"))
    assert out.returncode == 0, out.stderr[-3000:]
    for folder in (adapter, tmp_path / "merged"):
        assert set(modes(folder).values()) == {"0o644", "0o755"}, modes(folder)
        assert modes(folder)["."] == "0o755"


# ---------------------------------------------------------------- GGUF files


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random Llama exported to f16 GGUF (tests/test_export.py's helpers), + Modelfile,
    written under umask 022."""
    from test_export import tiny_llama

    from tutor.export import export_model
    from tutor.export.modelfile import write_modelfile
    from tutor.templates import get_template

    root = tmp_path_factory.mktemp("gguf")
    model, tok = tiny_llama(root / "src")
    old = os.umask(0o022)
    try:
        out = root / "tiny.gguf"
        export_model(model, tok, root / "src", out, "f16", ("<|im_end|>",))
        write_modelfile(out, get_template("chatml"))
    finally:
        os.umask(old)
    return out


def test_exported_gguf_and_modelfile_are_readable_by_others(tiny_gguf):
    assert [oct(p.stat().st_mode & 0o777) for p in (tiny_gguf, tiny_gguf.parent / "Modelfile")
            ] == ["0o644", "0o644"]


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_chat_refuses_a_truncated_or_fake_gguf_naming_the_file(tiny_gguf, tmp_path, backend):
    from tutor.export.check import check_gguf

    check_gguf(tiny_gguf)  # the whole file passes
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes())
    _, size = truncate(cut)
    fake = tmp_path / "notes.gguf"
    fake.write_text("hello, this is text\n")
    head = tmp_path / "head.gguf"
    head.write_bytes(tiny_gguf.read_bytes()[:200])
    for path, problem in [
        (cut, f"damaged GGUF file (its tensor table and data do not fit in its {size} "
              "bytes): truncated? export or copy it again"),
        (head, "damaged GGUF file (its tensor table and data do not fit in its 200 bytes): "
               "truncated? export or copy it again"),
        (fake, "not a GGUF file (it starts with b'hell', not b'GGUF'); pass a file written "
               "by `tutor export` or llama.cpp"),
    ]:
        one_line_error(tutor("chat", str(path), "--backend", backend, "--prompt", "hi"),
                       f"{path}: {problem}")
    if backend == "llama.cpp":  # eval opens a GGUF as chat's auto backend does
        one_line_error(tutor("eval", str(fake), "data/assistant_heldout.jsonl"),
                       f"{fake}: not a GGUF file (it starts with b'hell', not b'GGUF'); pass a "
                       "file written by `tutor export` or llama.cpp")
    assert listing(tmp_path) == ["cut.gguf", "head.gguf", "notes.gguf"]


def test_export_of_an_adapter_dir_says_to_pass_the_base_and_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "smollm2-135m-instruct", "r": 8}))
    one_line_error(tutor("export", str(adapter), str(tmp_path / "out.gguf")),
                   f"{adapter} is a LoRA adapter, not a full model; pass its base model and "
                   f"the adapter: tutor export smollm2-135m-instruct OUT.gguf --adapter "
                   f"{adapter}")
    assert listing(tmp_path) == ["adapter"]


# ---------------------------------------------------------------- more data files


def convert(tmp_path: Path, src: Path) -> subprocess.CompletedProcess[str]:
    return tutor("data", "convert", str(src), str(tmp_path / "out.jsonl"))


def test_a_200_kb_csv_cell_is_read_and_unused_columns_are_named(tmp_path):
    answer = "A long answer. " * 13_500  # 202,500 characters: past csv's 131,072 default
    src = tmp_path / "long.csv"
    src.write_text(f"id,question,answer,source\n7,Why?,\"{answer}\",wiki\n")
    out = convert(tmp_path, src)
    assert (out.returncode, out.stderr) == (0, f"tutor: warning: {src}: columns id, source not "
                                               "used by the 'qa' format (it reads question, "
                                               "answer)\n")
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["messages"] == [{"role": "user", "content": "Why?"},
                               {"role": "assistant", "content": answer}]
    import csv

    assert csv.field_size_limit() == 131_072  # raised only while reading


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])  # with and without a BOM
def test_a_utf16_file_is_named_with_the_fix(tmp_path, encoding):
    src = tmp_path / "excel.csv"
    src.write_text(AS_TEXT[".csv"], encoding=encoding)
    what = "UTF-16" if encoding == "utf-16" else ("UTF-16 or UTF-32 (NUL bytes between the "
                                                  "characters)")
    one_line_error(convert(tmp_path, src), f"{src}: the file is {what} text; tutor reads "
                   "UTF-8: save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 excel.csv > "
                   "excel.utf8.csv)")
    assert listing(tmp_path) == ["excel.csv"]


def test_a_json_array_saved_as_jsonl_is_told_to_rename(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text(AS_TEXT[".json"])  # pretty-printed: "[" alone on line 1
    one_line_error(convert(tmp_path, src), f"{src}:1: this is one JSON array, not JSON Lines "
                   "(one record per line); rename it to qa.json")
    assert listing(tmp_path) == ["qa.jsonl"]


def test_openai_content_parts_are_joined_and_images_refused(tmp_path):
    def record(parts):
        return json.dumps({"messages": [{"role": "user", "content": parts},
                                        {"role": "assistant", "content": "Paris."}]}) + "\n"

    src = tmp_path / "parts.jsonl"
    src.write_text(record([{"type": "text", "text": "Capital of France?"},
                           {"type": "text", "text": "One word."}]))
    assert convert(tmp_path, src).returncode == 0
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["messages"][0] == {"role": "user", "content": "Capital of France?\nOne word."}
    src.write_text(src.read_text() + record(
        [{"type": "text", "text": "What is this?"},
         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]))
    one_line_error(tutor("data", "convert", str(src), str(tmp_path / "again.jsonl")),
                   f"{src}:2: message 0: content part 1 is of type 'image_url'; the openai "
                   "format is trained on text parts only (type 'text')")
    assert listing(tmp_path) == ["out.jsonl", "parts.jsonl"]
