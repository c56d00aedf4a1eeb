"""Where a training step's time goes: torch.profiler over tutor's step, and an A/B of one
change to the step in one process.

Two A/B comparisons, each between two models built from the same seed:

  --ab dropout   peft's `nn.Dropout` ("torch": `bernoulli_` masks) against
                 `tutor.lora.LoRADropout` ("tutor") in every LoRA layer
  --ab compile   the eager model ("eager") against the same model with every decoder layer
                 compiled by `torch.compile(dynamic=True)` ("compiled"; inductor's C++ code
                 on CPU). The first step of each is timed apart: the compiled one's extra
                 time is the compile cost, and the table says after how many steps the
                 faster steady-state step would pay it back.
  --ab share     packs that repeat every sample's prefix ("whole") against packs that hold
                 the shared prefix once (``data.share_prefix``, "shared"). Their packs
                 differ, so compare trained tokens per second, not step times.

The step is bench/train_throughput.py's tutor config by default (the bundled SmolLM2-135M,
LoRA r=8 alpha=16 dropout 0.05 on all linear layers, four 512-token packs per optimizer
step, the precision tutor picks here), or a shipped recipe's own step with --recipe (e.g.
the course's default smollm2_135m_qlora_assistant: NF4 base, one pack per step). Steps
alternate between the two models (A, B, A, B, ...) so that load on a shared machine hits
both alike; the table gives the median step time of each and the top operators of one
profiled step of each.

    python bench/train_profile.py [--ab dropout|compile] [--recipe NAME] [--steps 6]
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

from tutor.common import IGNORE_INDEX  # noqa: E402

VARIANTS = {"dropout": ("torch", "tutor"), "compile": ("eager", "compiled"),
            "share": ("whole", "shared")}


def bench_config(work: Path):
    """bench/train_throughput.py's tutor config, on its 400 seeded conversations."""
    from tutor.train_config import config_from_dict

    train_file = tt.write_jsonl(tt.conversations(), work / "train.jsonl")
    return config_from_dict({
        "model": "smollm2-135m-instruct", "output_dir": str(work), "lora": tt.LORA,
        "data": {"datasets": [{"path": str(train_file)}], "max_length": tt.MAX_LENGTH},
        "train": {"batch_size": tt.ROWS, "lr": tt.LR, "seed": tt.SEED},
    })


def build(cfg, variant: str):
    """(model, batches, precision) for `cfg` with `variant` applied; same seed for all."""
    import dataclasses

    import torch

    from tutor.train import build_dataset, build_model, resolve_precision

    if variant in VARIANTS["share"]:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, share_prefix=variant == "shared"))
    precision = resolve_precision(cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = build_model(cfg, precision)
    if variant == "torch":  # back to peft's own dropout modules, same p
        from tutor.lora import LoRADropout

        for module in model.modules():
            drops = getattr(module, "lora_dropout", None)
            for name, layer in (drops.items() if drops is not None else []):
                if isinstance(layer, LoRADropout):
                    drops[name] = torch.nn.Dropout(layer.p)
    if variant == "compiled":  # the repeated block; packs differ in length, hence dynamic
        for layer in model.base_model.model.model.layers:
            layer.compile(dynamic=True)
    dataset, collator, _ = build_dataset(cfg, tokenizer, model.config._attn_implementation,
                                         model.dtype)
    rows = cfg.train.batch_size
    packs = [dataset[i] for i in range(len(dataset))]
    batches = [collator(packs[i:i + rows]) for i in range(0, len(packs) - rows + 1, rows)]
    return model, batches, precision


def step(model, optimizer, batch, precision: str) -> None:
    """One optimizer step with the loss tutor trains with (chunked over trained positions)."""
    import torch

    from tutor.chunked_loss import causal_lm_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        # No KV cache in a training step (the default builds one per layer, which also
        # makes a compiled layer recompile for each layer index).
        loss = causal_lm_loss(model, {**batch, "use_cache": False})
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ab", choices=sorted(VARIANTS), default="dropout")
    parser.add_argument("--recipe", help="profile a shipped recipe's step instead")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--rows", type=int, default=12, help="operators shown per profile")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tutor.train_config import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    cfg = load_config(args.recipe, [f"output_dir={work}"]) if args.recipe else bench_config(work)
    a, b = VARIANTS[args.ab]
    variants = {}
    for name in (a, b):
        model, batches, precision = build(cfg, name)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=cfg.train.lr)
        variants[name] = (model, opt, batches)
    print(f"{args.recipe or 'bench config'}: precision {precision}, "
          f"{torch.get_num_threads()} threads, {len(batches)} batches of "
          f"{cfg.train.batch_size} pack(s)")
    first, times = {}, {name: [] for name in variants}
    trained = {name: 0 for name in variants}  # target tokens of the timed steps
    for i in range(args.steps + 1):  # step 0 of each (warm-up, compile) is timed apart
        for name, (model, opt, batches) in variants.items():
            batch = batches[i % len(batches)]
            start = time.perf_counter()
            step(model, opt, batch, precision)
            elapsed = time.perf_counter() - start
            if i:
                times[name].append(elapsed)
                trained[name] += int((batch["shift_labels"] != IGNORE_INDEX).sum())
            else:
                first[name] = elapsed
    for name, (model, opt, batches) in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, opt, batches[0], precision)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n## {name}: first step {first[name]:.2f} s, median step "
              f"{statistics.median(times[name]):.2f} s over {args.steps} steps; one profiled "
              f"step, top operators by self time")
        print("| operator | self ms | share |\n| --- | --- | --- |")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} | "
                  f"{e.self_cpu_time_total / total:.1%} |")
    ta, tb = (statistics.median(times[n]) for n in (a, b))
    print(f"\nmedian step, {b} vs {a}: {tb:.2f} s vs {ta:.2f} s ({ta / tb:.2f}x)")
    ra, rb = (trained[n] / sum(times[n]) for n in (a, b))
    print(f"trained tok/s over the timed steps, {b} vs {a}: {rb:.1f} vs {ra:.1f} ({rb / ra:.2f}x)")
    extra = first[b] - first[a]
    if args.ab == "compile":
        saved = ta - tb
        pays = f"after {extra / saved:.0f} steps" if saved > 0 else "never (no step saved)"
        print(f"compile cost {extra:.1f} s (first step {first[b]:.1f} s vs {first[a]:.1f} s);"
              f" it pays back {pays}")


if __name__ == "__main__":
    main()
