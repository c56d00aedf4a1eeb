"""Keeping dependencies quiet: warnings about being offline, and progress bars.

tutor runs offline on purpose, so a dependency's warning that it cannot reach the hub is
noise, and on some CPUs only (see `OFFLINE_NOISE`), which once made a one-line-error test
fail on one machine and pass on another. `import tutor` calls `quiet_offline_warnings`
before any dependency is imported; this module is the one place that silences them.
Progress bars are switched off around loads and encodes that take a second.

Not handled: warnings a dependency prints with print() instead of logging or `warnings`,
and anything imported before `tutor` is (a notebook that imports peft first).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# Loggers of dependencies that warn about being offline, which is how tutor runs. On CPUs
# with AVX512-BF16 bitsandbytes (imported by peft too) tries to fetch an optional kernel
# from the hub at import and logs "Failed to load CPU gemm_4bit_forward from
# kernels-community"; its own CPU kernel is used instead. `import tutor` calls
# `quiet_offline_warnings`, so this is in place before anything imports bitsandbytes.
OFFLINE_NOISE = ("bitsandbytes.backends.cpu.ops",)


def quiet_offline_warnings() -> None:
    """Keep the loggers of `OFFLINE_NOISE` to errors (the one place that silences them)."""
    for name in OFFLINE_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def no_progress_bars(library: str = "transformers") -> Iterator[None]:
    """`library`'s progress bars ("transformers" or "datasets") off inside the block: a
    1-second load, save or encode needs none, and bars clutter notebooks."""
    if library == "datasets":
        import datasets as lib

        enabled, off, on = (lib.is_progress_bar_enabled, lib.disable_progress_bars,
                            lib.enable_progress_bars)
    else:
        from transformers.utils import logging as lib

        enabled, off, on = (lib.is_progress_bar_enabled, lib.disable_progress_bar,
                            lib.enable_progress_bar)
    was_enabled = enabled()
    off()
    try:
        yield
    finally:
        if was_enabled:
            on()
