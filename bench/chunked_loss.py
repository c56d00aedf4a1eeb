"""The chunked loss (tutor.chunked_loss) against today's logits_to_keep loss, on this CPU.

The bundled SmolLM2-135M-Instruct (vocab 49,152), LoRA r=8 on all linear layers, the assistant
data packed into 512-token rows, `--packs` rows per step, tutor.train's path (Trainer +
tutor.trainer.ValidationTrainer), no evaluation. Per mode, in its own subprocess:

  peak step MiB   tutor.measure.measure_step on one batch: live tensor bytes, forward +
                  backward + optimizer step (what the loss change is about)
  peak RSS MiB    the process's high-water mark (model loading included)
  trained tok/s   tutor's ThroughputCallback over `--steps` optimizer steps (first excluded)

    python bench/chunked_loss.py [--steps 6] [--packs 4] [--modes off,1024,256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def recipe(out: str, mode: str, steps: int, packs: int) -> dict:
    chunk = {"chunked_loss": False} if mode == "off" else {"chunked_loss": True,
                                                          "loss_chunk_size": int(mode)}
    return {
        "model": "smollm2-135m-instruct", "output_dir": out,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"datasets": [{"path": "data/assistant.jsonl"}], "max_length": 512},
        "train": {"max_steps": steps, "batch_size": packs, "lr": 2e-4, "scheduler": "constant",
                  "warmup_ratio": 0.0, "progress_bar": False, **chunk},
        "save": {"steps": 0}, "evaluation": {"prompts": []},
    }


def child(mode: str, steps: int, packs: int) -> dict:
    import torch

    from tutor.measure import measure_step, peak_rss_bytes
    from tutor.train import build_dataset, build_model, train
    from tutor.train_config import config_from_dict

    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict(recipe(out, mode, steps, packs))
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
        rss = peak_rss_bytes() / 2**20  # MiB
        # one more step on the first batch, measured op by op (slow: not timed)
        model, tok = build_model(cfg)
        data, collator, _ = build_dataset(cfg, tok, model.config._attn_implementation,
                                          model.dtype)
        batch = collator([data[i] for i in range(packs)])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        from tutor.chunked_loss import causal_lm_loss

        def loss_fn(m, b):
            return m(**b).loss if mode == "off" else causal_lm_loss(m, b, chunk=int(mode))

        loss_fn(model, batch).backward()
        opt.step()
        peak = measure_step(model, opt, batch, loss_fn).peak
    m = result.metrics
    return {"mode": mode, "trained_tok_s": m.get("trained_tok_s"), "peak_rss_mib": rss,
            "peak_step_mib": peak / 2**20, "train_s": seconds,
            "final_loss": [h["loss"] for h in result.log_history if "loss" in h][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--packs", type=int, default=4)
    ap.add_argument("--modes", default="off,1024,256")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.packs)))
        return
    print(f"{'mode':>6} {'trained tok/s':>14} {'peak step MiB':>14} {'peak RSS MiB':>13} "
          f"{'final loss':>11}")
    for mode in a.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps),
                              "--packs", str(a.packs)], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode:
            sys.exit(f"{mode}: failed\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:>6} {r['trained_tok_s']:>14.1f} {r['peak_step_mib']:>14.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['final_loss']:>11.4f}", flush=True)


if __name__ == "__main__":
    main()
