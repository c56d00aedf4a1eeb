"""DPO throughput on CPU: tutor's packed pairs vs. TRL's DPOTrainer, one run.

Same model (the bundled SmolLM2-135M-Instruct), same pairs (the course's
tutor/configs/data/pico_pairs.jsonl, optionally behind a long shared context), same LoRA
(bench/train_throughput.py's: r=8, alpha=16, dropout 0.05, all linear layers; a fresh
adapter, so both references are the base with the adapter disabled), same optimiser settings
(AdamW, lr 2e-4, constant, seed), DPO sigmoid with beta 0.1, and the same pairs per optimizer
step on average. Only what each framework decides differs:

  tutor   tutor.train with method dpo: native precision (bf16 autocast where the CPU has it),
          pairs packed into 512-token rows with the prompt once per pair (pack_pairs),
          sdpa_varlen, logits only where an answer token is predicted, ROWS rows per step
  trl     TRL's DPOTrainer at its best CPU settings found: use_cpu, bf16 where native, no
          gradient checkpointing, no precomputed reference (tutor computes it every step
          too), padding (its padding_free is disabled in TRL 1.16), prompt computed twice
          (chosen and rejected rows), pairs per step = tutor's mean pairs per step

``--long-prompt N`` puts an N-word shared system context before every prompt: the case
where computing the prompt once matters most. Each configuration runs in its own
subprocess (its own peak RSS), one after the other; ratios only mean something within one
run (CPUs differ, a shared CPU adds noise). "final loss" is the last step's batch loss (DPO
sigmoid; log 2 = 0.693 at the start), not comparable across different batches.

    python bench/dpo_throughput.py [--steps 10] [--long-prompt 0] [--only tutor,trl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402  (the SFT bench's settings and runner)
    LORA,
    LR,
    SEED,
    native_bf16,
    peft_lora,
    run_each,
    save_results,
)

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "tutor" / "configs" / "data" / "pico_pairs.jsonl"
MAX_LENGTH, ROWS, BETA = 512, 2, 0.1
CONTEXT = ("The Tutor Lab teaches people to fine-tune small language models on laptops, "
           "one notebook at a time, with exact tests. ")


def pair_file(out: Path, long_prompt: int) -> Path:
    """The course pairs as message lists, behind a `long_prompt`-word system context."""
    words = (CONTEXT.split() * (long_prompt // len(CONTEXT.split()) + 1))[:long_prompt]
    rows = []
    for line in PAIRS.read_text().splitlines():
        r = json.loads(line)
        system = [{"role": "system", "content": " ".join(words)}] if long_prompt else []
        rows.append({"prompt": [*system, {"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_per_step(path: Path) -> int:
    """Tutor's mean pairs per optimizer step (ROWS packs of MAX_LENGTH), for TRL's batch."""
    from tutor.data import encode_pairs, load_pairs
    from tutor.models import load_tokenizer
    from tutor.packing import pack_pairs

    pairs, _ = encode_pairs(load_pairs(path), load_tokenizer("smollm2-135m-instruct"))
    packs = pack_pairs(pairs, MAX_LENGTH)
    return max(1, round(len(pairs) / len(packs) * ROWS))


def run_tutor(steps: int, out: Path, path: Path) -> tuple[float, int, list[float]]:
    from tutor.train import train
    from tutor.train_config import config_from_dict

    cfg = config_from_dict({
        "model": "smollm2-135m-instruct", "output_dir": str(out / "run"), "lora": LORA,
        "method": "dpo", "preference": {"beta": BETA},
        "data": {"datasets": [{"path": str(path)}], "max_length": MAX_LENGTH},
        "train": {"max_steps": steps, "batch_size": ROWS, "lr": LR, "scheduler": "constant",
                  "warmup_ratio": 0.0, "seed": SEED, "progress_bar": False},
        "save": {"steps": 0},
    })
    pairs: list[int] = []
    from tutor import packing

    collate = packing.collate

    def counting(packs, *args, **kwargs):  # pairs in each batch the dataloader builds
        pairs.append(sum(len(p["indices"]) for p in packs))
        return collate(packs, *args, **kwargs)

    packing.collate = counting
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    loss = [h["loss"] for h in result.log_history if "loss" in h]
    return wall, sum(pairs[:result.global_step]), loss  # one batch per step (grad_accum 1)


def run_trl(steps: int, out: Path, path: Path) -> tuple[float, int, list[float]]:
    from trl import DPOConfig, DPOTrainer

    from tutor.data import load_pairs
    from tutor.models import load

    model, tok = load()
    batch = pairs_per_step(path)
    args = DPOConfig(
        output_dir=str(out / "trl"), max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", seed=SEED, use_cpu=True, bf16=native_bf16(),
        gradient_checkpointing=False, beta=BETA, loss_type=["sigmoid"], max_length=None,
        precompute_ref_log_probs=False, per_device_train_batch_size=batch, report_to=[],
        logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=load_pairs(path), peft_config=peft_lora())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return wall, batch * trainer.state.global_step, loss


def one(name: str, steps: int, long_prompt: int) -> dict:
    import logging

    logging.disable(logging.WARNING)
    out = Path(tempfile.mkdtemp(prefix=f"bench-dpo-{name}-"))
    path = pair_file(out, long_prompt)
    wall, pairs, loss = (run_tutor if name == "tutor" else run_trl)(steps, out, path)
    from tutor.measure import peak_rss_bytes

    return {"config": name, "long_prompt": long_prompt, "steps": len(loss),
            "wall_s": round(wall, 1), "pairs": pairs, "pairs_s": round(pairs / wall, 3),
            "peak_rss_mib": round(peak_rss_bytes() / 2**20), "final_loss": round(loss[-1], 4)}


def table(rows: list[dict]) -> str:
    trl = {r["long_prompt"]: r["pairs_s"] for r in rows if r["config"] == "trl"}
    lines = ["| config | long prompt (words) | steps | pairs | wall s | trained pairs/s "
             "| peak RSS MiB | final loss | pairs/s vs TRL |", "|" + " --- |" * 9]
    for r in rows:
        base = trl.get(r["long_prompt"])
        ratio = f"{r['pairs_s'] / base:.2f}×" if base else "n/a"
        lines.append(f"| {r['config']} | {r['long_prompt']} | {r['steps']} | {r['pairs']} | "
                     f"{r['wall_s']} | {r['pairs_s']} | {r['peak_rss_mib']} | "
                     f"{r['final_loss']} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--long-prompt", type=int, default=0, metavar="WORDS")
    parser.add_argument("--only", default="tutor,trl")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.steps, args.long_prompt)), flush=True)
        return
    rows = run_each(__file__, args.only.split(","),
                    ["--steps", str(args.steps), "--long-prompt", str(args.long_prompt)])
    save_results("dpo_throughput", rows, table(rows))

if __name__ == "__main__":
    main()
