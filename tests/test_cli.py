"""The `tutor` command: fast start, version, models listing, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from tutor import __version__


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tutor", *args], capture_output=True, text=True, **kw
    )


def test_help_does_not_import_torch():
    code = (
        "import sys, tutor.cli; tutor.cli.build_parser().format_help(); "
        "import tutor.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "models" in out.stdout and "demo" in out.stdout


def test_version():
    out = run("--version")
    assert out.stdout.strip() == f"tutor {__version__}"


def test_models_lists_bundled_and_cache(tmp_path):
    env = {**__import__("os").environ, "TUTOR_HOME": str(tmp_path)}
    out = run("models", env=env)
    assert out.returncode == 0
    assert "smollm2-135m-instruct" in out.stdout
    assert str(tmp_path / "models" / "smollm2-135m-instruct") in out.stdout


def test_bad_model_path_is_one_line_error(tmp_path):
    out = run("demo", "--model", str(tmp_path / "missing"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"tutor: error: no model directory at {tmp_path / 'missing'}; "
                     "pass a directory with config.json, a hub id, or the bundled "
                     "'smollm2-135m-instruct'"]
