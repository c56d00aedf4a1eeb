"""Checking saved weights and checkpoints before anything loads them.

A machine that dies during a save, a full disk or an interrupted copy leaves files that
look right by name: a truncated ``adapter_model.safetensors``, or a ``checkpoint-N``
without ``trainer_state.json`` (Trainer writes that file last, so its absence means the
save did not finish). Loading such files ends deep inside safetensors or torch with a
traceback; these checks read only headers and file sizes (milliseconds, no tensor is
loaded) and raise a one-line `TutorError` naming the file and what to do.

A safetensors file is ``[8-byte little-endian header length N][N bytes of JSON][data]``;
the JSON gives each tensor's dtype, shape and ``data_offsets`` [begin, end) into the
data section. A complete file is exactly ``8 + N + max(end)`` bytes long and each
tensor spans ``numel * itemsize`` bytes.

Not handled: checksums (a flipped byte inside the data passes), DeepSpeed's own
``global_stepN/`` shards (only their presence as .pt zip archives is checked), and
pickled ``.bin`` weights (tutor never loads them).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from tutor.errors import TutorError

TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Bytes per element of the safetensors dtypes; sub-byte float types are left unchecked.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
            "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
            "U64": 8, "I64": 8, "F64": 8, "C64": 8}


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """Raise `TutorError` unless `path` is a complete safetensors file; return its header
    (tensor name → ``{"dtype", "shape", "data_offsets"}``, without ``__metadata__``)."""
    path = Path(path)
    size = path.stat().st_size
    damaged = f"{path}: damaged safetensors file"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TutorError(f"{damaged} ({size} bytes, shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise TutorError(f"{damaged} (header of {n} bytes, file of {size}): truncated")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TutorError(f"{damaged} (its header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise TutorError(f"{damaged} (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    end = 0
    for name, spec in header.items():
        try:
            begin, stop = spec["data_offsets"]
            numel = math.prod(spec["shape"])
        except (TypeError, KeyError, ValueError) as exc:
            raise TutorError(f"{damaged} (tensor '{name}' has no valid shape/offsets)") from exc
        width = ITEMSIZE.get(spec.get("dtype"))
        if not 0 <= begin <= stop or (width is not None and stop - begin != numel * width):
            raise TutorError(f"{damaged} (tensor '{name}': offsets {begin}..{stop} do not "
                             f"fit its shape {spec['shape']} {spec.get('dtype')})")
        end = max(end, stop)
    if end != data:
        state = "truncated" if end > data else "has trailing bytes"
        raise TutorError(f"{damaged} (the header needs {8 + n + end} bytes, the file has "
                         f"{size}): {state}")
    return header


def check_weights(folder: str | Path) -> None:
    """Check every ``*.safetensors`` file directly inside `folder` (see `check_safetensors`)."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def check_resumable(checkpoint: str | Path) -> int:
    """Raise `TutorError` unless `checkpoint` is a finished Trainer save; return its step.

    Finished: ``trainer_state.json`` is present and valid (written last by Trainer),
    every safetensors file is complete, and every ``.pt``/``.pth`` file (optimizer,
    scheduler, RNG states, torch's zip format) is a readable zip archive.
    """
    checkpoint = Path(checkpoint)
    state = checkpoint / TRAINER_STATE
    if not state.is_file():
        raise TutorError(f"{checkpoint}: no {TRAINER_STATE} (the save did not finish)")
    try:
        step = json.loads(state.read_text(encoding="utf-8-sig"))["global_step"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise TutorError(f"{state}: damaged (no readable global_step)") from exc
    check_weights(checkpoint)
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]):
        if not zipfile.is_zipfile(path):
            raise TutorError(f"{path}: damaged (not a complete torch archive)")
    return int(step)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` directories of `output_dir`, newest (largest N) first."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)] \
        if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name)[1]), reverse=True)


def newest_resumable(output_dir: str | Path) -> tuple[Path, int, list[str]]:
    """(newest finished checkpoint, its step, why each newer one was skipped).

    Raises `TutorError` saying how to proceed when there is no checkpoint at all or
    none is finished.
    """
    skipped: list[str] = []
    for checkpoint in checkpoints(output_dir):
        try:
            return checkpoint, check_resumable(checkpoint), skipped
        except TutorError as exc:
            skipped.append(str(exc))
    if not skipped:
        raise TutorError(f"--resume: no checkpoint-N in {output_dir}; start without --resume")
    raise TutorError(f"--resume: no finished checkpoint in {output_dir} ({skipped[0]}); "
                     "delete the damaged checkpoint-N folders, or start without --resume "
                     "into a new output_dir")
