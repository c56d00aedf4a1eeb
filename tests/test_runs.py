"""tutor.runs: one run per output_dir (refuse / --resume / --overwrite), its lock file, and
the writability check. The end-to-end cases (a finished run's directory reused, two runs at
once, SIGTERM) run the real command in tests/test_faults.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tutor.common import CONFIG_FILE
from tutor.errors import TutorError
from tutor.runs import LOCK_FILE, acquire_lock, check_writable, claim_output_dir, release_lock

HOST = socket.gethostname()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_records_pid_and_host_and_refuses_a_second_holder(tmp_path):
    lock = acquire_lock(tmp_path)
    assert lock == tmp_path / LOCK_FILE
    assert lock.read_text() == f"{os.getpid()} {HOST}\n"
    with pytest.raises(TutorError) as exc:
        acquire_lock(tmp_path)
    assert str(exc.value) == (f"output_dir: {tmp_path} is in use by another run (pid "
                              f"{os.getpid()} on {HOST}, lock {lock}); wait for it to end, "
                              "or choose another output_dir")
    release_lock(lock)
    assert not lock.exists()


def test_a_stale_lock_is_taken_over_with_one_warning(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / LOCK_FILE).write_text(f"{pid} {HOST}\n")  # a run killed with SIGKILL
    lock = acquire_lock(tmp_path)
    assert lock.read_text() == f"{os.getpid()} {HOST}\n"
    assert capsys.readouterr().err == (f"tutor: warning: {lock}: taking over a stale lock "
                                       f"(pid {pid} is not running)\n")


def test_a_lock_from_another_host_or_unreadable_counts_as_live(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text(f"{dead_pid()} other-host\n")  # its pid cannot be checked from here
    with pytest.raises(TutorError, match=r"in use by another run \(pid \d+ on other-host, "):
        acquire_lock(tmp_path)
    lock.write_text("garbage")
    with pytest.raises(TutorError, match=r"in use by another run \(an unreadable lock, "):
        acquire_lock(tmp_path)
    release_lock(lock)  # not ours: left alone
    assert lock.read_text() == "garbage"


def test_a_non_empty_output_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    for name in ("metrics.jsonl", "adapter_config.json", "loss.png", CONFIG_FILE):
        (run / name).write_text("old")
    with pytest.raises(TutorError) as exc, claim_output_dir(run):
        pass
    assert str(exc.value) == (f"output_dir: {run} already holds files (adapter_config.json, "
                              "checkpoint-2, loss.png, metrics.jsonl, ...); pass --resume to "
                              "continue that run, --overwrite to replace it, or choose "
                              "another output_dir")
    assert sorted(p.name for p in run.iterdir()) == [  # untouched, lock removed
        "adapter_config.json", "checkpoint-2", "loss.png", "metrics.jsonl", CONFIG_FILE]
    with claim_output_dir(run, resume=True):
        assert (run / LOCK_FILE).is_file() and (run / "checkpoint-2").is_dir()
    with claim_output_dir(run, overwrite=True):
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]  # nothing of the old run left
    assert list(run.iterdir()) == []
    with pytest.raises(TutorError, match="^--resume continues the run in output_dir and "
                       "--overwrite deletes it; pass one of them$"):
        with claim_output_dir(run, resume=True, overwrite=True):
            pass


def test_an_empty_or_missing_output_dir_is_fine_and_a_failed_run_leaves_no_new_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with claim_output_dir(empty):
        (empty / "metrics.jsonl").write_text("{}\n")
    assert [p.name for p in empty.iterdir()] == ["metrics.jsonl"]  # the lock is gone
    missing = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), claim_output_dir(missing):
        raise RuntimeError("the model failed to load")
    assert not missing.exists()  # created for the run, empty: removed again
    with pytest.raises(KeyboardInterrupt), claim_output_dir(empty, resume=True):
        raise KeyboardInterrupt  # Ctrl-C or SIGTERM (tutor.cli): the lock is still removed
    assert [p.name for p in empty.iterdir()] == ["metrics.jsonl"]


def test_torchrun_ranks_other_than_zero_take_no_lock(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-1").mkdir()  # rank 0 has started writing
    monkeypatch.setenv("RANK", "1")
    with claim_output_dir(tmp_path):
        assert not (tmp_path / LOCK_FILE).exists()


def test_an_output_dir_that_cannot_be_written(tmp_path, monkeypatch):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(TutorError, match=f"^output_dir: {afile} is a file, not a directory; "
                       "choose another output_dir$"):
        check_writable(afile / "run")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root passes every permission check: answer as for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real(p, mode))
    with pytest.raises(TutorError, match=f"^output_dir: cannot write to {readonly} "
                       r"\(permission denied\); choose another output_dir$"):
        check_writable(readonly / "runs" / "one")
    check_writable(tmp_path / "new" / "run")  # missing parents are created later
