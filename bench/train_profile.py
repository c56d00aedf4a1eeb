"""Where a training step's time goes: torch.profiler over tutor's step, and A/B of the
LoRA dropout implementations in one process.

The step is bench/train_throughput.py's tutor config (the bundled SmolLM2-135M, LoRA r=8
alpha=16 dropout 0.05 on all linear layers, four 512-token packs per optimizer step, the
precision tutor picks here). Two models are built from the same seed: one with peft's
`nn.Dropout` ("torch": `bernoulli_` masks) and one with `tutor.lora.LoRADropout` ("tutor").
Steps alternate between them (A, B, A, B, ...) so that load on a shared machine hits both
alike; the table gives the median step time of each and the top operators of one profiled
step of each.

    python bench/train_profile.py [--steps 6] [--rows 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the benchmark's data and settings)


def build(train_file: Path, tutor_dropout: bool):
    """(model, batches, precision) for the bench config; the same seed for both variants."""
    import torch

    from tutor.train import build_dataset, build_model, resolve_precision
    from tutor.train_config import config_from_dict

    cfg = config_from_dict({
        "model": "smollm2-135m-instruct", "output_dir": str(train_file.parent), "lora": tt.LORA,
        "data": {"datasets": [{"path": str(train_file)}], "max_length": tt.MAX_LENGTH},
        "train": {"batch_size": tt.ROWS, "lr": tt.LR, "seed": tt.SEED},
    })
    precision = resolve_precision("auto")
    torch.manual_seed(tt.SEED)
    model, tokenizer = build_model(cfg, precision)
    if not tutor_dropout:  # back to peft's own dropout modules, same p
        from tutor.lora import LoRADropout

        for module in model.modules():
            drops = getattr(module, "lora_dropout", None)
            for name, layer in (drops.items() if drops is not None else []):
                if isinstance(layer, LoRADropout):
                    drops[name] = torch.nn.Dropout(layer.p)
    dataset, collator, _ = build_dataset(cfg, tokenizer, model.config._attn_implementation,
                                         model.dtype)
    packs = [dataset[i] for i in range(len(dataset))]
    batches = [collator(packs[i:i + tt.ROWS]) for i in range(0, len(packs) - tt.ROWS, tt.ROWS)]
    return model, batches, precision


def step(model, optimizer, batch, precision: str) -> None:
    """One optimizer step with the loss tutor trains with (chunked over trained positions)."""
    import torch

    from tutor.chunked_loss import causal_lm_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--rows", type=int, default=12, help="operators shown per profile")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    train_file = tt.write_jsonl(tt.conversations(), work / "train.jsonl")
    variants = {}
    for name, ours in (("torch", False), ("tutor", True)):
        model, batches, precision = build(train_file, ours)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tt.LR)
        variants[name] = (model, opt, batches)
    print(f"precision {precision}, {torch.get_num_threads()} threads, "
          f"{len(batches)} batches of {tt.ROWS} packs")
    times = {name: [] for name in variants}
    for i in range(args.steps + 1):  # step 0 of each is a warm-up, not timed
        for name, (model, opt, batches) in variants.items():
            start = time.perf_counter()
            step(model, opt, batches[i % len(batches)], precision)
            if i:
                times[name].append(time.perf_counter() - start)
    for name, (model, opt, batches) in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, opt, batches[0], precision)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {name} dropout: median step {statistics.median(times[name]):.2f} s "
              f"over {args.steps} steps; one profiled step, top operators by self time")
        print("| operator | self ms | share |\n| --- | --- | --- |")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} | "
                  f"{e.self_cpu_time_total / total:.1%} |")
    t, u = (statistics.median(times[n]) for n in ("torch", "tutor"))
    print(f"\nstep time, tutor dropout vs torch dropout: {u:.2f} s vs {t:.2f} s ({t / u:.2f}x)")


if __name__ == "__main__":
    main()
