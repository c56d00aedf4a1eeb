"""Hub ids offline: use the Hugging Face cache, or fail at once.

transformers treats an unreachable hub as a flaky one and retries for ~50 s before it
falls back to the cache or fails, so an offline typo in a hub id used to cost a minute.
`hub_or_cache` asks once (a TCP connection, ~0.2 s) and, offline, hands transformers the
cached snapshot directory or raises a one-line `TutorError`.

Not handled: private repos and revisions other than ``main`` offline (only the cached
``main`` snapshot is found), and proxies (behind one the hub is assumed reachable).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from tutor.errors import TutorError


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
