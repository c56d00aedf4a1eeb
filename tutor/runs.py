"""Run directories: what a run, an adapter or a merged model records, and who owns a run.

What each directory records (every file name and key defined here; tutor's JSON records
written with `write_record` and read with `recorded`):

- a run or checkpoint directory: ``tutor_config.yaml`` (`tutor.common.CONFIG_FILE`, the
  recipe as trained; written by `tutor.callbacks`), read with `recorded_config`; and the
  logs `tutor.callbacks` writes: ``METRICS_FILE``, ``LOSS_PLOT``, ``PROGRESS_FILE``;
- an adapter directory (`tutor convert`): ``ADAPTER_META``, the base model, template, system
  prompt, bits and precision it was trained with;
- a merged model directory (`tutor merge`): ``MERGED_META``, provenance and the logits check;
- a converted bundled model: ``SOURCE_FILE``, the GGUF it came from (written last: its
  presence marks a finished conversion);
- an exported GGUF file: the recipe's system prompt under the metadata key ``GGUF_SYSTEM_KEY``
  (written by `tutor.export.writer`, read by `tutor.chat.load.pick_system`).

`recorded(path, key)` answers from whichever of these a directory holds; `pick_template` and
`recorded_system` choose what chat, eval and export use by default.

A run directory belongs to one run: claimed before training, locked while it runs.

`tutor train` writes checkpoints, metrics.jsonl, loss.png and the adapter into
``output_dir``. Two runs mixing there is silent damage: a finished run's checkpoint-2 beside
a new run's checkpoint-1 makes ``--resume`` (and "convert the newest checkpoint") pick the
old run, and two runs at once interleave metrics.jsonl and overwrite each other's adapter.
So `claim_output_dir`:

- checks that output_dir can be written (before any model or data loads);
- takes the lock file ``LOCK_FILE`` inside it (``O_CREAT | O_EXCL``: exactly one process
  wins), recording ``pid host``. A lock whose process is gone on this host is stale (a run
  killed with SIGKILL): it is taken over with a one-line warning. A live one is refused,
  naming its pid;
- refuses a non-empty output_dir unless the run resumes (``--resume``) or replaces it
  (``--overwrite``: the old run's files are deleted first, so nothing of it can be picked
  later). An empty or missing output_dir is fine;
- removes the lock when the run ends, also on an error or an interrupt (Ctrl-C, SIGTERM;
  the CLI turns SIGTERM into the same exception as Ctrl-C), and an output_dir it created
  for a run that failed before writing anything.

Not handled: locks on network file systems where ``O_EXCL`` is not atomic, a lock from
another host (its pid cannot be checked, so it is treated as live), and a stale lock whose pid
a new process has taken since: both are refused; delete the file by hand once that run is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tutor.common import CONFIG_FILE
from tutor.errors import TutorError, warn

LOCK_FILE = ".tutor.lock"
ADAPTER_META = "tutor_adapter.json"  # written by convert: base model + template
MERGED_META = "tutor_model.json"  # written by merge: provenance + the logits check
SOURCE_FILE = "source.json"  # written last by a bundled model's conversion: the GGUF it read
METRICS_FILE = "metrics.jsonl"  # a run's training and validation logs, one JSON object a line
LOSS_PLOT = "loss.png"  # a run's loss curves
PROGRESS_FILE = "tutor_progress.json"  # token totals inside each checkpoint dir
GGUF_SYSTEM_KEY = "tutor.system"  # GGUF metadata: the recipe's system prompt, when it set one


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file tutor or peft wrote; a damaged one is a one-line `TutorError` naming it."""
    try:  # utf-8-sig: a file saved by an editor that writes a BOM reads the same
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TutorError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def write_record(folder: Path, name: str, meta: dict[str, Any]) -> Path:
    """Write `meta` as `folder/name` (``ADAPTER_META``, ``MERGED_META``, ``SOURCE_FILE``):
    indented JSON, one trailing newline. Callers write into a temporary directory that is
    renamed into place, so no half-written record is ever seen."""
    path = Path(folder) / name
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def recorded_config(checkpoint: Path) -> dict[str, Any]:
    """The `tutor_config.yaml` of a checkpoint (or of its parent run directory), or {}."""
    import yaml

    for folder in (checkpoint, checkpoint.parent):
        path = folder / CONFIG_FILE
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise TutorError(f"{path}: not valid YAML ({exc})") from exc
            if not isinstance(data, dict):
                raise TutorError(f"{path}: expected a mapping of config keys")
            return data
    return {}


def recorded(path: str | Path, key: str) -> Any:
    """`key` from the tutor metadata of an adapter or merged directory, else from the
    `tutor_config.yaml` of a run or checkpoint directory, else None."""
    for name in (ADAPTER_META, MERGED_META):
        meta = Path(path) / name
        if meta.is_file():
            return read_json(meta).get(key)
    return recorded_config(Path(path)).get(key) if Path(path).is_dir() else None


def pick_template(model: str, adapter: str | None, requested: str | None) -> str:
    """The chat template to use: --prompt-template, else the one recorded at training
    (adapter dir, then merged model dir), else "auto" (the tokenizer's own)."""
    if requested:
        return requested
    for folder in (adapter, model):
        if folder and Path(folder).is_dir() and recorded(folder, "template"):
            return str(recorded(folder, "template"))
    return "auto"


def recorded_system(model: str, adapter: str | None) -> str | None:
    """The recipe's ``system:`` recorded at training (adapter dir, then model dir: tutor's
    metadata or a run's tutor_config.yaml), else None. A GGUF file's own is read by
    `tutor.chat.load.pick_system`."""
    for folder in (adapter, model):
        if folder and Path(folder).is_dir() and recorded(folder, "system") is not None:
            return str(recorded(folder, "system"))
    return None


def check_writable(output_dir: str | os.PathLike[str]) -> None:
    """TutorError unless `output_dir` is (or can be created as) a writable directory."""
    existing = Path(output_dir).absolute()
    while not existing.exists():  # the nearest ancestor that exists is where mkdir writes
        existing = existing.parent
    if not existing.is_dir():
        raise TutorError(f"output_dir: {existing} is a file, not a directory; choose another "
                         "output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TutorError(f"output_dir: cannot write to {existing} (permission denied); "
                         "choose another output_dir")


def _alive(pid: int) -> bool:
    """Does process `pid` exist on this host? (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    return True


def acquire_lock(output_dir: str | os.PathLike[str]) -> Path:
    """Create ``output_dir/LOCK_FILE`` holding ``"pid host"``; return its path.

    A stale lock (its pid is not alive on this host) is replaced with a warning; a live
    one, or one from another host, is a TutorError naming it.
    """
    lock = Path(output_dir) / LOCK_FILE
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            pid, host = _owner(lock)
            if host == socket.gethostname() and pid is not None and not _alive(pid):
                warn(f"{lock}: taking over a stale lock (pid {pid} is not running)")
                lock.unlink(missing_ok=True)
                continue
            who = f"pid {pid} on {host}" if pid is not None else "an unreadable lock"
            raise TutorError(f"output_dir: {output_dir} is in use by another run ({who}, "
                             f"lock {lock}); wait for it to end, or choose another "
                             "output_dir") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return lock
    raise TutorError(f"output_dir: could not take the lock {lock}; another run took it")


def _owner(lock: Path) -> tuple[int | None, str]:
    """(pid, host) recorded in `lock`; (None, "") when it cannot be read."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def release_lock(lock: Path) -> None:
    """Remove `lock` if this process still owns it (never another run's)."""
    if _owner(lock) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


def _check_reuse(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless resuming; with `overwrite`, empty it."""
    old = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_FILE)
    if not old or resume:
        return
    if not overwrite:
        shown = ", ".join(old[:4]) + (", ..." if len(old) > 4 else "")
        raise TutorError(f"output_dir: {output_dir} already holds files ({shown}); pass "
                         "--resume to continue that run, --overwrite to replace it, or "
                         "choose another output_dir")
    for name in old:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextmanager
def claim_output_dir(output_dir: str | os.PathLike[str], resume: bool = False,
                     overwrite: bool = False) -> Iterator[Path]:
    """Hold `output_dir` for one run (see the module docstring); yields its path.

    Under torchrun only rank 0 claims it (the other ranks write into rank 0's run).
    """
    if resume and overwrite:
        raise TutorError("--resume continues the run in output_dir and --overwrite deletes "
                         "it; pass one of them")
    path = Path(output_dir)
    check_writable(path)
    if os.environ.get("RANK", "0") != "0":
        yield path
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(path)
    try:
        _check_reuse(path, resume, overwrite)
        yield path
    except BaseException:
        release_lock(lock)
        if created and not any(path.iterdir()):  # failed before writing: leave no trace
            path.rmdir()
        raise
    release_lock(lock)
