"""Execute notebooks in place and strip execution noise, so committed outputs are clean.

Usage: python tools/run_notebooks.py nbs/01_chat_templates.ipynb [...]

Removes widget state (it is megabytes of JSON and meaningless without a live kernel),
per-cell execution timestamps and the kernel's volatile metadata. Outputs stay, so a
reader on a code host sees results without running anything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

VOLATILE_CELL_KEYS = ("execution", "collapsed", "scrolled")


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop widget state and timing metadata; keep outputs and execution counts."""
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                                 "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
        for out in cell.get("outputs", []):
            # Live widget views reference state we just dropped; keep their text fallback.
            data = out.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)


def run(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - start
    clean(nb)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)  # atomic: a failed run never leaves a half-written notebook
    return seconds


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {run(Path(arg)):.1f} s", flush=True)
