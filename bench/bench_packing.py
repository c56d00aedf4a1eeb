"""Packer speed and quality: tutor.packing.pack vs. TRL's pack_dataset, in one run.

Run by hand (not in CI): ``PYTHONPATH=. python bench/bench_packing.py [N]``. Lengths are
resampled from the course's assistant + geography QA samples (encoded with the bundled
model's template), so the distribution is real; N samples, max_length 512 and 1024.
Prints seconds per call and packs/utilisation for each packer; compare only within a run.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path


def course_lengths() -> list[int]:
    from tutor.data import encode, load_conversations
    from tutor.models import load

    _, tokenizer = load()
    data = Path(__file__).resolve().parent.parent / "data"
    convs = [m for f in ("assistant.jsonl", "geography_qa.jsonl")
             for m in load_conversations(data / f)["messages"]]  # fmt: skip
    return [len(encode(m, tokenizer)["input_ids"]) for m in convs]


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(n: int) -> None:
    import datasets
    from trl.data_utils import pack_dataset

    from tutor.packing import pack

    datasets.disable_progress_bars()
    rng = random.Random(0)
    lengths = rng.choices(course_lengths(), k=n)
    samples = [{"input_ids": [1] * k, "labels": [1] * k} for k in lengths]
    ds = datasets.Dataset.from_dict({"input_ids": [s["input_ids"] for s in samples]})
    whole = {"batch_size": n}  # TRL packs per map batch (default 1000): give it everything
    print(f"{n} samples, {sum(lengths)} tokens")
    for max_length in (512, 1024):
        for name, fn in {
            "tutor bfd": lambda m=max_length: pack(samples, m),
            "tutor greedy": lambda m=max_length: pack(samples, m, "greedy"),
            "trl bfd": lambda m=max_length: pack_dataset(ds, m, "bfd", map_kwargs=whole),
        }.items():
            seconds, out = best_of(fn)
            rows = [len(r) for r in out["input_ids"]] if name.startswith("trl") else out.lengths
            util = sum(rows) / (len(rows) * max_length)
            print(f"{max_length:5d} {name:>13}: {seconds:7.3f} s, {len(rows)} packs, {util:.2%}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
