"""Running offline: hub ids from the cache, and dependencies kept quiet about it.

tutor runs offline on purpose. Two things follow, both here:

- Hub ids: transformers treats an unreachable hub as a flaky one and retries for ~50 s
  before it falls back to the cache or fails, so an offline typo in a hub id used to cost
  a minute. `hub_or_cache` asks once (a TCP connection, ~0.2 s) and, offline, hands
  transformers the cached snapshot directory or raises a one-line `TutorError`.
- Quiet dependencies: a dependency's warning that it cannot reach the hub is noise, and on
  some CPUs only (see `OFFLINE_NOISE`), which once made a one-line-error test fail on one
  machine and pass on another. `import tutor` calls `quiet_offline_warnings` before any
  dependency is imported; this module is the one place that silences them. Progress bars
  are switched off around loads and encodes that take a second (`no_progress_bars`).

Not handled: private repos and revisions other than ``main`` offline (only the cached
``main`` snapshot is found), proxies (behind one the hub is assumed reachable), warnings a
dependency prints with print() instead of logging or `warnings`, and anything imported
before `tutor` is (a notebook that imports peft first).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence

from tutor.errors import TutorError

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


def hub_or_cache(repo_id: str, known: Sequence[str] = ()) -> str:
    """`repo_id` as is when the hub answers, else its cached snapshot directory, else a
    `TutorError` that suggests the closest of the `known` local names (bundled models)."""
    import difflib

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if hub_reachable():
        return repo_id
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        pass
    close = difflib.get_close_matches(repo_id, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else (
        "use a local directory" + (f" or the bundled '{known[0]}'" if known else ""))
    raise TutorError(f"'{repo_id}' is no local directory, not in the Hugging Face cache, "
                     f"and the hub cannot be reached (offline); {hint}")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub accepts a TCP connection (False if HF_HUB_OFFLINE is set,
    True behind an HTTPS proxy, which this probe cannot see past)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let huggingface_hub go through it as usual
    url = urlsplit(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
