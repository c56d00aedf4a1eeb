"""Names every stage of the data flow shares, defined once (torch-free, standard library only).

    raw file → conversations (list[Message]) → encode → Sample → pack → collate → Trainer
                                                                       └→ checkpoint (CONFIG_FILE)

- `Message`: one turn, ``{"role": "system"|"user"|"assistant", "content": str}``.
- `Sample`: an encoded conversation, ``{"input_ids": [T], "labels": [T]}``; a label of
  `IGNORE_INDEX` means "no loss here" (the value PyTorch's cross-entropy skips).
- `CONFIG_FILE`: the resolved recipe that training writes into every output and checkpoint
  directory; merge, convert and chat read the base model and chat template from it.
- `atomic_file` / `atomic_write`: write beside the target, then rename, so a reader (or a
  crash) never sees half a file.

Not handled here: anything that needs torch or transformers (those live in the modules of the
stage that uses them).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
Message = Mapping[str, Any]  # {"role": "system"|"user"|"assistant", "content": str}
Sample = dict[str, list[int]]  # {"input_ids": [T], "labels": [T]} of equal length
CONFIG_FILE = "tutor_config.yaml"


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was. The parent
    directory is created when missing. Not handled: directories (see `tutor.merge.atomic_dir`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
