"""tutor.launch: the commands parse as torchrun's and DeepSpeed's own parsers read them, the
done line round-trips, and a run that overstays its timeout is killed with all its ranks.

The real two-rank ZeRO-2 run is tests/test_train.py::test_zero2_on_two_cpu_ranks.
"""

from __future__ import annotations

import os
import shlex
import time

import pytest

from tutor.errors import TutorError
from tutor.launch import (
    condense,
    deepspeed_command,
    hostfile_text,
    run_local,
    torchrun_command,
)

RECIPE = "llama3_8b_instruct_qlora_deepspeed"


def test_single_node_torchrun_is_standalone_and_parses():
    from torch.distributed.run import get_args_parser

    cmd = torchrun_command(RECIPE, nproc=8, deepspeed="zero3", overrides=["train.epochs=1"])
    assert shlex.join(cmd) == ("torchrun --standalone --nproc_per_node 8 -m tutor train "
                               f"{RECIPE} --deepspeed zero3 --set train.epochs=1")
    args = get_args_parser().parse_args(cmd[1:])
    assert args.standalone and args.nproc_per_node == "8" and args.module
    assert [args.training_script, *args.training_script_args] == cmd[cmd.index("tutor"):]


def test_multi_node_torchrun_names_node_and_master():
    from torch.distributed.run import get_args_parser

    cmd = torchrun_command(RECIPE, nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1")
    args = get_args_parser().parse_args(cmd[1:])
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        "2", 1, "10.0.0.1", 29500)
    assert not args.standalone
    with pytest.raises(TutorError, match="several nodes need master_addr"):
        torchrun_command(RECIPE, nnodes=2)
    with pytest.raises(TutorError, match="0 <= node_rank < nnodes"):
        torchrun_command(RECIPE, nnodes=2, node_rank=2, master_addr="h")


def test_deepspeed_launcher_command_and_hostfile_parse_as_deepspeed_reads_them():
    from deepspeed.launcher.runner import _parse_hostfile, parse_args

    cmd = deepspeed_command(RECIPE, hostfile="hosts", deepspeed="zero2")
    args = parse_args(cmd[1:])
    assert args.hostfile == "hosts" and args.module and args.no_local_rank
    assert [args.user_script, *args.user_args] == ["tutor", "train", RECIPE,
                                                   "--deepspeed", "zero2"]
    text = hostfile_text({"gpu-node-1": 8, "gpu-node-2": 8})
    assert text == "gpu-node-1 slots=8\ngpu-node-2 slots=8\n"
    assert dict(_parse_hostfile(text.splitlines())) == {"gpu-node-1": 8, "gpu-node-2": 8}
    with pytest.raises(TutorError, match="slots >= 1"):
        hostfile_text({"a": 0})


def test_the_cli_rank_report_is_what_run_local_reads(tmp_path, capsys, monkeypatch):
    """tutor.cli writes each rank's JSON report, tutor.launch reads it: they must not drift."""
    import tutor.train
    from tutor.cli import main
    from tutor.launch import REPORT_DIR_ENV, RankReport, read_rank_reports

    result = tutor.train.TrainResult(tmp_path, 12, {
        "train_runtime": 8.0, "trained_tok_s": 230.0, "all_tok_s": 480.0, "train_loss": 9.75,
        "optimizer_bytes": 19318680}, [])
    monkeypatch.setattr(tutor.train, "train", lambda *a, **k: result)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path / "reports"))
    assert main(["train", "whatever.yaml"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("rank 1/2 done: 12 steps") and condense(line) == line
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["rank-1.json"]
    assert read_rank_reports(tmp_path / "reports") == {1: RankReport(1, 2, 12, 9.75, 19318680)}
    monkeypatch.delenv(REPORT_DIR_ENV)  # no launcher asked: nothing is written
    assert main(["train", "whatever.yaml"]) == 0
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["rank-1.json"]


def test_condense_keeps_losses_results_and_errors():
    assert condense("{'loss': '10.82', 'grad_norm': '1.301', 'learning_rate': '0.001'}") == (
        "loss 10.82  grad norm 1.301")
    assert condense("[WARNING] [real_accelerator.py:213] Setting accelerator to CPU.") is None
    assert condense("ValueError: bad") == "ValueError: bad"


def test_a_bad_recipe_fails_before_anything_is_launched(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\noutput_dir: out\ntrain: {lrr: 1}\n")
    with pytest.raises(TutorError, match=r"train\.lrr: unknown key"):
        run_local(bad, echo=None)


def test_timeout_kills_the_launcher_and_its_ranks(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: smollm2-135m-instruct\noutput_dir: {tmp_path / 'out'}\n"
                   "data: {datasets: [{path: data/assistant.jsonl}]}\n")
    shown: list[str] = []
    start = time.perf_counter()
    result = run_local(cfg, timeout=2, echo=shown.append)
    assert result.returncode == -9 and shown[-1] == "killed after 2 s"
    assert time.perf_counter() - start < 30 and result.ranks == {} and result.losses == []
    with pytest.raises(ProcessLookupError):  # no process of its group is left
        os.killpg(result.pid, 0)
