"""7B/8B QLoRA at 2,048 tokens on one CUDA GPU: measured peak memory next to tutor.memory's.

Memory and speed do not depend on the weights' values, so no checkpoint is downloaded: the
model is a randomly initialised decoder of a real shape (`tutor.memory.KNOWN`), written once
as a bf16 safetensors checkpoint (with the bundled tokenizer) under --workdir, then trained
with tutor's own path — `tutor.train.train`: tutor.models.load with bitsandbytes NF4 + double
quantisation, peft LoRA, packing, `tutor.trainer.ValidationTrainer` with the chunked loss
— on synthetic pretraining text (every token trained: the estimator's assumption), one
2,048-token pack per step. Printed per model:

  peak allocated   torch.cuda.max_memory_allocated() over the training steps (model
                   loading excluded: the counter is reset when training starts)
  peak reserved    torch.cuda.max_memory_reserved() (the caching allocator's high-water mark)
  paged optimizer  bitsandbytes' paged optimizer state lives in CUDA unified memory, outside
                   torch's allocator: its bytes (tutor.measure.optimizer_held_bytes) are
                   printed and added to "peak allocated" before comparing with the estimate
  estimate         tutor.memory.estimate for the same shape and settings
  trained tok/s    tutor's ThroughputCallback (first step excluded)

InternLM2 has a fused wqkv; transformers has no native InternLM2 class and tutor never runs
remote code, so its shape is built as a Llama with separate q/k/v (the same parameters; LoRA
then adapts 7 linears per block, not 5), and the estimate is for that shape.

    python bench/gpu_memory.py [--model internlm2-chat-7b] [--steps 6] [--seq-len 2048]
                               [--no-chunked-loss] [--offload] [--optim adamw_torch]

Without a CUDA device it prints one line and exits with status 1. ~3-5 minutes per model
on one recent GPU (writing the 15 GB checkpoint once is the slow part; it is reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tutor.memory import GPU_RECIPE, KNOWN, Arch, Setup, estimate  # noqa: E402

MODELS = ("internlm2-chat-7b", "llama-3-8b", "mistral-7b", "llama-2-7b", "qwen2.5-7b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    g = GPU_RECIPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=MODELS,
                    help="a shape from tutor.memory.KNOWN (repeatable; default internlm2-chat-7b)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is warm-up)")
    ap.add_argument("--seq-len", type=int, default=g.seq_len)
    ap.add_argument("--lora-r", type=int, default=g.lora_r)
    ap.add_argument("--lora-dropout", type=float, default=g.lora_dropout)
    ap.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction,
                    default=g.chunked_loss)
    ap.add_argument("--loss-chunk", type=int, default=g.loss_chunk)
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=g.offload)
    ap.add_argument("--optim", default=g.optimizer, help="train.optim (transformers' name)")
    ap.add_argument("--workdir", default="/tmp/tutor_gpu_memory",
                    help="random checkpoints and runs are written here")
    args = ap.parse_args(argv)
    args.model = args.model or ["internlm2-chat-7b"]
    return args


def built_arch(name: str) -> Arch:
    """The shape as this bench builds it (InternLM2's fused wqkv split into q/k/v)."""
    return dataclasses.replace(KNOWN[name], fused_qkv=False)


def hf_config(arch: Arch) -> Any:
    """A transformers config of `arch`'s shape: Qwen2 for q/k/v biases, else Llama."""
    from transformers import LlamaConfig, Qwen2Config

    shape = {"vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
             "intermediate_size": arch.intermediate_size,
             "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_heads,
             "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim,
             "tie_word_embeddings": arch.tie_embeddings, "max_position_embeddings": 32768,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    return Qwen2Config(**shape) if arch.qkv_bias else LlamaConfig(**shape)


def setup_for(args: argparse.Namespace) -> Setup:
    """The estimator's Setup for this run (bf16, one pack of --seq-len tokens per step)."""
    optimizer = "paged_adamw_8bit" if "8bit" in args.optim else "adamw"
    return Setup(method="qlora", seq_len=args.seq_len, batch=1, grad_checkpointing=True,
                 optimizer=optimizer, lora_r=args.lora_r, lora_dropout=args.lora_dropout,
                 dtype="bfloat16", chunked_loss=args.chunked_loss, loss_chunk=args.loss_chunk,
                 offload=args.offload)


def recipe(args: argparse.Namespace, model_dir: Path, data: Path, out: Path) -> dict:
    """The tutor recipe this bench trains: the GPU QLoRA recipes' settings, --steps steps."""
    return {
        "model": str(model_dir), "output_dir": str(out), "bits": 4,
        "lora": {"r": args.lora_r, "alpha": 16, "dropout": args.lora_dropout},
        "data": {"datasets": [{"path": str(data)}], "max_length": args.seq_len,
                 "packing": "bfd"},
        "train": {"max_steps": args.steps, "batch_size": 1, "grad_accum": 1, "lr": 2e-4,
                  "scheduler": "constant", "warmup_ratio": 0.0, "precision": "bf16",
                  "gradient_checkpointing": True, "offload_activations": args.offload,
                  "chunked_loss": args.chunked_loss, "loss_chunk_size": args.loss_chunk,
                  "optim": args.optim, "progress_bar": False, "logging_steps": 1},
        "save": {"steps": 0}, "evaluation": {"prompts": []},
        "attn_implementation": "auto",  # flash-attn's varlen kernel if installed, else sdpa_varlen
    }


def write_text_data(path: Path, n: int, words: int = 2500, seed: int = 0) -> Path:
    """`n` long random-word texts as pretraining conversations: each fills a whole pack."""
    rng = random.Random(seed)
    vocab = ["alpha", "river", "stone", "light", "seven", "green", "north", "paper", "cloud"]
    with path.open("w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "assistant", "content": text}]}) + "\n")
    return path


def random_checkpoint(arch: Arch, path: Path) -> Path:
    """A random bf16 checkpoint of `arch`'s shape + the bundled tokenizer, written once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tutor.models import ensure_bundled

    if (path / "config.json").is_file():
        return path
    config = hf_config(arch)
    with torch.device("cuda"):  # random init on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ensure_bundled()).save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    tmp.rename(path)
    return path


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import TrainerCallback

    from tutor.train import train
    from tutor.train_config import config_from_dict

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    arch = built_arch(name)
    model_dir = random_checkpoint(arch, work / f"{name}-random")
    data = write_text_data(work / "text.jsonl", n=args.steps + 2)

    class PeakMemory(TrainerCallback):
        def on_train_begin(self, *a, **k):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    cfg = config_from_dict(recipe(args, model_dir, data, work / f"{name}-run"))
    start = time.perf_counter()
    result = train(cfg, callbacks=[PeakMemory()], overwrite=True)  # --workdir is reused
    torch.cuda.synchronize()
    est = estimate(arch, setup_for(args))
    paged = result.metrics["optimizer_bytes"] if "paged" in args.optim else 0
    return {"model": name, "seconds": time.perf_counter() - start,
            "peak_allocated": torch.cuda.max_memory_allocated(), "paged_optimizer": paged,
            "peak_reserved": torch.cuda.max_memory_reserved(), "estimate": est.total,
            "trained_tok_s": result.metrics.get("trained_tok_s"), "steps": result.global_step}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_memory.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the estimate alone: tutor memory MODEL", file=sys.stderr)
        return 1
    gib = 2**30
    print(f"{torch.cuda.get_device_name()} · QLoRA r={args.lora_r} · {args.seq_len} tokens · "
          f"chunked loss {args.chunked_loss} ({args.loss_chunk}) · offload {args.offload} · "
          f"{args.optim}")
    print(f"{'model':<20}{'peak alloc GiB':>15}{'peak reserved':>15}{'paged optim':>12}"
          f"{'estimate GiB':>14}{'est/measured':>13}{'trained tok/s':>15}")
    for name in args.model:
        r = run_one(name, args)
        measured = r["peak_allocated"] + r["paged_optimizer"]
        print(f"{name:<20}{r['peak_allocated'] / gib:>15.2f}{r['peak_reserved'] / gib:>15.2f}"
              f"{r['paged_optimizer'] / gib:>12.2f}{r['estimate'] / gib:>14.2f}"
              f"{r['estimate'] / measured:>13.3f}{r['trained_tok_s']:>15.0f}", flush=True)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
