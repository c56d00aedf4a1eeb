"""tutor installed from a wheel runs outside the repository: recipes, their data, the demo.

The wheel is built from this checkout and installed into a fresh virtual environment, offline
(``--no-index``). Its dependencies are this environment's: a ``.pth`` file appends our
site-packages to the new environment's path, after its own (so the wheel's `tutor`, not the
editable checkout, is the one imported). The commands run from an empty directory, so nothing
can be found relative to the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tutor.common import CONFIG_FILE

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(bin dir of a fresh venv with the wheel installed, environment to run it in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(ROOT)], tmp, env)
    wheel = next((tmp / "dist").glob("tutor-*.whl"))
    run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp, env)
    python = tmp / "venv" / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    tmp, env).strip())
    (site / "zz_tutor_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp, env)
    return python.parent, env


def test_the_wheel_ships_the_recipes_and_their_data(installed, tmp_path):
    bin_dir, env = installed
    where = run([str(bin_dir / "python"), "-c",
                 "import tutor, tutor.train_config as c; print(tutor.__file__); "
                 "print(sorted(p.name for p in c.DATA_DIR.iterdir() if p.suffix != '.md'))"],
                tmp_path, env)
    module, data = where.splitlines()
    assert module.startswith(str(bin_dir.parent)) and str(ROOT) not in module
    assert data == str(["assistant.jsonl", "assistant_heldout.jsonl", "everyday_qa.jsonl",
                        "general_probe.jsonl", "geography_qa.jsonl", "pico_pairs.jsonl",
                        "pico_pairs_heldout.jsonl", "pretrain_corpus.jsonl", "raw_qa.csv"])
    listed = run([str(bin_dir / "tutor"), "list-cfg"], tmp_path, env)
    assert "smollm2_135m_qlora_assistant" in listed
    assert "lab" in run([str(bin_dir / "tutor"), "--help"], tmp_path, env)  # the course's entry


def test_the_installed_demo_and_recipe_run_from_an_empty_directory(installed, tmp_path):
    bin_dir, env = installed
    quick = run([str(bin_dir / "tutor"), "demo", "--quick"], tmp_path, env)
    assert "Paris" in quick
    out = tmp_path / "run"
    run([str(bin_dir / "tutor"), "train", "smollm2_135m_qlora_assistant",
         "--set", "train.max_steps=2", "--set", f"output_dir={out}"], tmp_path, env)
    assert (out / "adapter_model.safetensors").is_file() and (out / CONFIG_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing else written here
