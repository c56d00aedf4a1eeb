"""Launching `tutor train` on several processes: a local ZeRO run, and the commands for many GPUs.

torchrun (``python -m torch.distributed.run``) starts `nproc` processes per node and gives each
RANK, LOCAL_RANK and WORLD_SIZE; every process runs the same ``tutor train`` and
``transformers.Trainer`` hands the model to DeepSpeed, which shards as its JSON says
(tutor/configs/deepspeed/). On CPUs the ranks talk over gloo/shared memory, on GPUs over NCCL::

    one node, 8 GPUs    torchrun --standalone --nproc_per_node 8 -m tutor train RECIPE
    node k of 2         torchrun --nnodes 2 --node_rank k --master_addr HOST0 --master_port 29500
                                 --nproc_per_node 8 -m tutor train RECIPE   (run on every node)
    DeepSpeed launcher  deepspeed --hostfile hostfile --no_local_rank --module tutor train RECIPE
                        (one command on the first node; it starts the others over ssh/pdsh)

`run_local` runs the first form here as a subprocess and reports what every rank wrote when it
finished (a small JSON file per rank, `write_rank_report`, in a folder the launcher names in
``TUTOR_RANK_REPORT_DIR``) and the loss curve rank 0 wrote.

Not handled: SLURM/MPI launchers, elastic restarts, checking that the hosts can reach each
other; the multi-node commands are built here but cannot be run on a single machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tutor.common import atomic_write
from tutor.errors import TutorError
from tutor.runs import METRICS_FILE
from tutor.train_config import load_config

REPORT_DIR_ENV = "TUTOR_RANK_REPORT_DIR"  # set by run_local: where ranks write rank-R.json
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # what child processes must import
LAUNCH_ID = "TUTOR_LAUNCH_ID"  # environment variable marking every process of one run_local


def _tail(deepspeed: str | None, overrides: Sequence[str]) -> list[str]:
    ds = ["--deepspeed", deepspeed] if deepspeed else []
    return [*ds, *(a for kv in overrides for a in ("--set", kv))]


def torchrun_command(config: str | os.PathLike[str], *, nproc: int = 2, nnodes: int = 1,
                     node_rank: int = 0, master_addr: str | None = None,
                     master_port: int = 29500, deepspeed: str | None = None,
                     overrides: Sequence[str] = (), python: str | None = None) -> list[str]:
    """The torchrun command line for `tutor train config` (argv list; `shlex.join` to print).

    One node without `master_addr` uses ``--standalone`` (a free local port, so concurrent
    runs do not collide). Several nodes need `master_addr`, reachable from all of them; run
    the same command on every node with its own `node_rank`. `python` runs torchrun as
    ``python -m torch.distributed.run`` (the interpreter of this environment).
    """
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise TutorError(f"need nproc >= 1, nnodes >= 1 and 0 <= node_rank < nnodes "
                         f"(got {nproc}, {nnodes}, {node_rank})")
    if nnodes > 1 and not master_addr:
        raise TutorError("several nodes need master_addr: the address of node 0, "
                         "reachable from every node")
    launcher = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
    if master_addr:
        where = ["--nnodes", str(nnodes), "--node_rank", str(node_rank),
                 "--master_addr", master_addr, "--master_port", str(master_port)]
    else:
        where = ["--standalone"]
    return [*launcher, *where, "--nproc_per_node", str(nproc), "-m", "tutor", "train",
            str(config), *_tail(deepspeed, overrides)]


def deepspeed_command(config: str | os.PathLike[str], *, hostfile: str = "hostfile",
                      deepspeed: str | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """DeepSpeed's own launcher for `tutor train config` on the hosts of `hostfile`.

    ``--no_local_rank``: the launcher would otherwise append ``--local_rank=N``, which
    ``tutor train`` does not take (Trainer reads LOCAL_RANK from the environment instead).
    """
    return ["deepspeed", "--hostfile", hostfile, "--no_local_rank", "--module", "tutor",
            "train", str(config), *_tail(deepspeed, overrides)]


def hostfile_text(slots: Mapping[str, int]) -> str:
    """A DeepSpeed hostfile: one ``host slots=N`` line per node (N GPUs on it)."""
    if not slots or any(n < 1 for n in slots.values()):
        raise TutorError("a hostfile needs at least one host, each with slots >= 1")
    return "".join(f"{host} slots={n}\n" for host, n in slots.items())


@dataclass(frozen=True)
class RankReport:
    """What one rank reports when it finished (`write_rank_report`, read by `run_local`)."""

    rank: int
    world: int
    steps: int
    mean_loss: float  # Trainer's train_loss: the mean over all steps of the run
    optimizer_bytes: int  # what this rank's optimizer holds (its ZeRO shard)


@dataclass
class LaunchResult:
    command: list[str]
    pid: int  # the launcher's, also its process group's id
    returncode: int  # -9 when killed after `timeout`
    wall_s: float
    ranks: dict[int, RankReport]
    losses: list[float]  # per logged step, from rank 0's metrics.jsonl
    log: list[str] = field(repr=False)  # every line the ranks printed, stdout and stderr


def condense(line: str) -> str | None:
    """The lines of a training log worth showing: settings, losses, results, errors."""
    if line.startswith("{'loss'"):
        loss = re.search(r"'loss': '([^']+)'", line)
        norm = re.search(r"'grad_norm': '([^']+)'", line)
        return f"loss {loss[1] if loss else '?'}" + (f"  grad norm {norm[1]}" if norm else "")
    keep = ("tutor.train: attention", "done:", "Traceback", "Error", "error:")
    return line if any(k in line for k in keep) else None


def run_local(config: str | os.PathLike[str], *, nproc: int = 2, deepspeed: str | None = "zero2",
              overrides: Sequence[str] = (), timeout: float = 600,
              echo: Callable[[str], None] | None = print) -> LaunchResult:
    """Run ``torchrun --standalone --nproc_per_node nproc -m tutor train config`` here.

    Streams `condense`d lines to `echo` while it runs; after `timeout` seconds, or when
    interrupted (Ctrl-C), the launcher and every process it started are killed (`_kill`).
    The recipe is validated first (a bad key fails here, not in
    `nproc` processes). Losses are read from the lines rank 0 appended to metrics.jsonl.
    """
    out = Path(load_config(config, list(overrides)).output_dir)
    metrics = out / METRICS_FILE
    start_at = metrics.stat().st_size if metrics.is_file() else 0
    cmd = torchrun_command(config, nproc=nproc, deepspeed=deepspeed, overrides=overrides,
                           python=sys.executable)
    launch_id = uuid.uuid4().hex  # inherited by every process of this launch: see _kill
    with tempfile.TemporaryDirectory(prefix="tutor-ranks-") as reports:
        env = {**os.environ, LAUNCH_ID: launch_id, REPORT_DIR_ENV: reports,
               "PYTHONPATH": os.pathsep.join(
                   p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        try:
            returncode, log = _follow(proc, start, timeout, echo)
        finally:  # finished, timed out, Ctrl-C or an error: nothing of this launch stays running
            _kill(proc, launch_id)
        ranks = read_rank_reports(reports)
    if returncode == -9 and echo:
        echo(f"killed after {timeout:.0f} s")
    wall = time.perf_counter() - start
    return LaunchResult(cmd, proc.pid, returncode, wall, ranks, _losses(metrics, start_at), log)


def _follow(proc: subprocess.Popen, start: float, timeout: float,
            echo: Callable[[str], None] | None) -> tuple[int, list[str]]:
    """Collect the launcher's output lines until it exits (its return code) or `timeout`
    seconds after `start` pass (-9: the caller kills it)."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
    log: list[str] = []
    returncode = None
    while returncode is None:
        left = timeout - (time.perf_counter() - start)
        try:
            if left <= 0:
                raise queue.Empty
            line = lines.get(timeout=left)
        except queue.Empty:  # out of time
            return -9, log
        if line is None:  # the pipe closed: the launcher is exiting
            try:
                return proc.wait(timeout=max(left, 1)), log
            except subprocess.TimeoutExpired:
                return -9, log
        log.append(line)
        shown = condense(line)
        if echo and shown:
            echo(shown)
    return returncode, log


def _kill(proc: subprocess.Popen, launch_id: str, grace: float = 10.0) -> None:
    """SIGKILL the launcher (if still running) and every process of its launch, whatever
    session it is in.

    Killing the launcher's process group is not enough: torchrun starts each rank with
    ``start_new_session=True``, and a killed launcher's ranks live on under init. So the
    launcher's descendants are listed while it still holds them, and afterwards every
    process whose environment carries this launch's `LAUNCH_ID` is swept up as well
    (a rank's own children, one started while we listed). Returns once none is left
    running (a zombie awaiting its new parent counts as gone) or `grace` seconds pass.
    """
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # first the launcher: it starts no rank again
    proc.wait()
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in [*tree, *_launched(launch_id)] if _running(p)]
        if not alive or time.monotonic() > deadline:
            return
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        time.sleep(0.05)


def _launched(launch_id: str) -> list:
    """The processes (psutil) whose environment holds ``LAUNCH_ID=launch_id``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone, a zombie, or another user's
            if p.environ().get(LAUNCH_ID) == launch_id:
                found.append(p)
    return found


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def write_rank_report(steps: int, mean_loss: float, optimizer_bytes: int) -> Path | None:
    """Write this rank's `RankReport` as JSON where `run_local` asked (``$TUTOR_RANK_REPORT_DIR``).

    Rank and world size come from torchrun's RANK / WORLD_SIZE (0 / 1 without torchrun).
    Returns the file written, or None when no launcher asked for one.
    """
    folder = os.environ.get(REPORT_DIR_ENV)
    if not folder:
        return None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    report = RankReport(rank, world, steps, mean_loss, optimizer_bytes)
    return atomic_write(Path(folder) / f"rank-{rank}.json", json.dumps(dataclasses.asdict(report)))


def read_rank_reports(folder: str | os.PathLike[str]) -> dict[int, RankReport]:
    """Every ``rank-R.json`` in `folder`, by rank (ranks that died before the end are absent)."""
    reports = (RankReport(**json.loads(p.read_text(encoding="utf-8")))
               for p in Path(folder).glob("rank-*.json"))
    return {r.rank: r for r in reports}


def _losses(metrics: Path, offset: int) -> list[float]:
    if not metrics.is_file():
        return []
    with metrics.open(encoding="utf-8") as f:
        f.seek(offset)
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]

