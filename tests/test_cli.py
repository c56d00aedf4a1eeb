"""The `tutor` command: fast start, version, models listing, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from tutor import __version__


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tutor", *args], capture_output=True, text=True, **kw
    )


# Runs the CLI as `python -m tutor` does, but first makes bitsandbytes' CPU backend log,
# right after it is imported, the warning it logs on CPUs with AVX512-BF16 when it cannot
# fetch its optional kernel from the hub (offline). On this CPU or any other, the warning
# then reaches stderr unless tutor silenced that logger before bitsandbytes was imported.
# The backend's import is recorded in the file named by BNB_IMPORTED.
OFFLINE_BNB = """
import importlib.abc, importlib.machinery, logging, os, sys

NAME = "bitsandbytes.backends.cpu.ops"

class WarnAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            logging.getLogger(NAME).warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: No module "
                "named 'kernels'. Please make sure you already `pip install kernels` and "
                "the kernels >= 0.11.1")
            open(os.environ["BNB_IMPORTED"], "w").close()

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, WarnAfterImport())
from tutor.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_offline_bnb(tmp_path, *args: str, imported: bool = True,
                    ) -> subprocess.CompletedProcess[str]:
    """`tutor *args` with bitsandbytes warning as it does offline on AVX512-BF16 CPUs;
    asserts bitsandbytes' CPU backend was imported (else the test would prove nothing), or,
    with ``imported=False``, that it was not: the command refused before loading a model."""
    marker = tmp_path / "bnb-imported"
    marker.unlink(missing_ok=True)
    env = {**__import__("os").environ, "BNB_IMPORTED": str(marker)}
    out = subprocess.run([sys.executable, "-c", OFFLINE_BNB, *args], capture_output=True,
                         text=True, env=env)
    assert marker.is_file() == imported, (
        f"bitsandbytes' CPU backend was {'not ' if imported else ''}imported on this path")
    return out


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
    # refused before peft/bitsandbytes load (the run's file names come from tutor.runs, not
    # from the Trainer callbacks module); tests/test_faults.py covers bitsandbytes' warning
    out = run_offline_bnb(tmp_path, "demo", "--model", str(tmp_path / "missing"),
                          imported=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"tutor: error: no model directory at {tmp_path / 'missing'}; "
                     "pass a directory with config.json, a hub id, or the bundled "
                     "'smollm2-135m-instruct'"]
