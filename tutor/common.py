"""Names every stage of the data flow shares, defined once (torch-free, standard library only).

    raw file → conversations (list[Message]) → encode → Sample → pack → collate → Trainer
                                                                       └→ checkpoint (CONFIG_FILE)

- `Message`: one turn, ``{"role": "system"|"user"|"assistant", "content": str}``.
- `Sample`: an encoded conversation, ``{"input_ids": [T], "labels": [T]}``; a label of
  `IGNORE_INDEX` means "no loss here" (the value PyTorch's cross-entropy skips).
- `CONFIG_FILE`: the resolved recipe that training writes into every output and checkpoint
  directory; merge, convert and chat read the base model and chat template from it.
- `atomic_file` / `atomic_write` / `atomic_dir`: write beside the target, then rename, so a
  reader (or a crash) never sees half a file or half a model directory. The renamed result
  gets the mode an ordinary write would (`umask_mode`: 644/755 under umask 022), not the
  600/700 of a temporary, so a teammate or a model server (Ollama) can read it;
  `apply_umask` does the same for a directory other libraries wrote (training runs).

Not handled here: anything that needs torch or transformers (those live in the modules of the
stage that uses them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tutor.errors import TutorError

IGNORE_INDEX = -100
Message = Mapping[str, Any]  # {"role": "system"|"user"|"assistant", "content": str}
Sample = dict[str, list[int]]  # {"input_ids": [T], "labels": [T]} of equal length
CONFIG_FILE = "tutor_config.yaml"


def umask_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give a new file (0o666) or directory (0o777) under
    the process umask; os.umask can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the umask's modes (`umask_mode`).

    For what other libraries wrote: safetensors 0.8 saves through a temporary file and
    leaves every ``*.safetensors`` at 600 whatever the umask. Symbolic links are skipped.
    """
    root = Path(root)
    file, folder = umask_mode(), umask_mode(directory=True)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, folder if path.is_dir() else file)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was. The parent
    directory is created when missing. For directories see `atomic_dir`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())  # mkstemp made it 600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` by rename.

    An existing `out` is refused unless `force`; with `force` it is replaced only
    after the new directory is complete, so `out` is never half-written. The directory and
    all it holds get the umask's modes (`apply_umask`) before the rename.
    """
    out = Path(out)
    if out.exists() and not force:
        raise TutorError(f"{out} already exists; choose another OUT or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp made it 700, safetensors its files 600
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.rename(old / "x")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
