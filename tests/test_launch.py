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
    result.start_step = 4  # resumed: the report counts only the steps this run did
    assert main(["train", "whatever.yaml"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("rank 1/2 done: 8 steps in 8 s (after step 4, now at 12), ")
    assert read_rank_reports(tmp_path / "reports")[1].steps == 8
    monkeypatch.delenv(REPORT_DIR_ENV)  # no launcher asked: nothing is written
    (tmp_path / "reports" / "rank-1.json").unlink()
    assert main(["train", "whatever.yaml"]) == 0
    assert list((tmp_path / "reports").iterdir()) == []


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


# Each rank of the launches below starts a session of its own (as torchrun's ranks do) and
# a grandchild in yet another session, writes both PIDs into RANK_PIDS, then prints a line
# every 0.1 s forever: the ranks never reach `tutor train`, so only the killing is tested.
SITECUSTOMIZE = """
import os, subprocess, sys, time
if "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ:
    if os.getsid(0) != os.getpid():
        os.setsid()
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}  # not a rank itself
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env=env, start_new_session=True)
    folder = os.environ["RANK_PIDS"]
    with open(os.path.join(folder, f".{os.getpid()}"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(os.path.join(folder, f".{os.getpid()}"), os.path.join(folder, str(os.getpid())))
    while True:
        print("rank", os.environ["LOCAL_RANK"], "holding", flush=True)
        time.sleep(0.1)
"""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def hanging_ranks(tmp_path, monkeypatch):
    """(recipe, folder where each rank leaves "pid grandchild-pid", a clock for run_local
    whose `when_ready` is called once both ranks have reported)."""
    from types import SimpleNamespace

    import tutor.launch

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("RANK_PIDS", str(pids))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: smollm2-135m-instruct\noutput_dir: {tmp_path / 'out'}\n"
                   "data: {datasets: [{path: data/assistant.jsonl}]}\n")
    clock = SimpleNamespace(when_ready=lambda: 0.0)

    def perf_counter() -> float:  # run_local's clock; it reads it on every line
        ready = len([p for p in pids.iterdir() if not p.name.startswith(".")]) == 2
        return time.perf_counter() + (clock.when_ready() if ready else 0.0)

    monkeypatch.setattr(tutor.launch, "time", SimpleNamespace(
        perf_counter=perf_counter, monotonic=time.monotonic, sleep=time.sleep))
    return cfg, pids, clock


def reported(pids) -> list[int]:
    return [int(n) for f in pids.iterdir() if not f.name.startswith(".")
            for n in f.read_text().split()]


def test_timeout_kills_the_launcher_and_every_rank_in_its_own_session(hanging_ranks):
    cfg, pids, clock = hanging_ranks
    clock.when_ready = lambda: 1e6  # both ranks up: from now on the timeout has passed
    shown: list[str] = []
    result = run_local(cfg, timeout=300, echo=shown.append, deepspeed=None)
    assert result.returncode == -9 and shown[-1] == "killed after 300 s"
    assert result.ranks == {} and result.losses == []
    everyone = reported(pids)
    assert len(everyone) == 4  # two ranks, each with its grandchild
    assert [pid for pid in [result.pid, *everyone] if alive(pid)] == []


def test_ctrl_c_during_a_launch_leaves_no_process_behind(hanging_ranks):
    cfg, pids, clock = hanging_ranks

    def interrupt() -> float:
        raise KeyboardInterrupt  # as Ctrl-C would, inside run_local's loop

    clock.when_ready = interrupt
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, timeout=300, echo=None, deepspeed=None)
    everyone = reported(pids)
    assert len(everyone) == 4
    assert [pid for pid in everyone if alive(pid)] == []
