"""A recipe's data section, before encoding: which records of which file train or validate.

`split_datasets` reads each ``data.datasets`` file, holds out ``data.validation`` (a file, or
the same fraction of each file's records, drawn by `held_out`), and gives each part its
weight, which `weighted` applies. SFT conversations (`tutor.train.load_samples`) and
preference pairs (`tutor.preference_train.load_pair_samples`) take the same road, so a
validation record is never trained on in either.

Not handled: encoding and packing (the callers), streaming datasets (records are read whole).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tutor.data import encode
from tutor.errors import TutorError
from tutor.train_config import resolve_data_path

if TYPE_CHECKING:
    from tutor.train_config import TrainConfig


def held_out(n: int, fraction: float, seed: str) -> list[int]:
    """Sorted indices of the `fraction` of `n` conversations kept for validation.

    At least one is held out and at least one is left to train on; the draw depends only
    on `seed` and `n` (tutor seeds it with ``"{train.seed}:{dataset path}"``), so the same
    recipe always holds out the same conversations, whatever else changes.
    """
    if not 0 < fraction < 1:
        raise TutorError(f"data.validation: a fraction must be between 0 and 1, not {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise TutorError(f"data.validation: holding out {k} of {n} conversations leaves "
                         "none to train on; use a smaller fraction or a validation file")
    return sorted(random.Random(seed).sample(range(n), k))


def split_datasets(cfg: TrainConfig, split: str, load: Callable[[str, str], Any],
                   ) -> list[tuple[str, float, Any]]:
    """(path, weight, records) per data file of `split`, each read by ``load(path, format)``.

    ``split="validation"``: the file named by ``data.validation``, or each dataset's held-out
    fraction (`held_out`), weight 1. The fraction is drawn from the records *before*
    encoding, weighting and packing, and the ``"train"`` split leaves exactly those out, so
    a validation record is never trained on. No validation configured: [].
    """
    if not cfg.data.datasets:
        raise TutorError("data.datasets: the recipe names no dataset")
    val, validation = cfg.data.validation, split == "validation"
    files = [(spec.path, spec.format, spec.weight) for spec in cfg.data.datasets]
    if validation and not isinstance(val, float):
        files = [(val, "auto", 1.0)] if val else []
    key = "data.validation" if validation and isinstance(val, str) else "data.datasets"
    out = []
    for path, fmt, weight in files:
        records = load(resolve_data_path(path, key), fmt)
        if isinstance(val, float):
            held = held_out(len(records), val, f"{cfg.train.seed}:{path}")
            keep = held if validation else sorted(set(range(len(records))) - set(held))
            records = records.select(keep)
        out.append((path, 1.0 if validation else weight, records))
    return out


def weighted(rows: list, weight: float, rng: random.Random) -> list:
    """`rows` repeated by the whole part of `weight`, plus a random `rng` share of the rest."""
    whole, frac = divmod(weight, 1.0)
    return rows * int(whole) + rng.sample(rows, round(frac * len(rows)))


def check_max_length(cfg: TrainConfig, tokenizer: Any) -> None:
    """data.max_length must hold the template's framing of a one-token exchange plus its
    answer, else truncation would leave nothing to train in any sample."""
    exchange = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    need = len(encode(exchange, tokenizer, cfg.template)["input_ids"])
    if cfg.data.max_length < need:
        raise TutorError(f"data.max_length: {cfg.data.max_length} tokens cannot hold even a "
                         f"one-token exchange in the '{cfg.template}' template ({need} "
                         "tokens); raise it (recipes use 512 or more)")
