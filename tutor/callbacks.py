"""Trainer callbacks: what the model says while it learns, how fast, and the loss curve.

- `EvaluateChatCallback` (like XTuner's EvaluateChatHook): greedy answers to the recipe's
  prompts before training, every N steps and at the end; a before/after table; and the
  recipe's ``evaluation.files`` scored by `tutor.eval` before and after training.
- `ThroughputCallback`: trained tokens/s (tokens with a target), all tokens/s and an
  estimated MFU, added to every log line; token totals survive `--resume`.
- `MetricsCallback`: every log line (training and validation loss) appended to
  ``metrics.jsonl`` and ``loss.png`` (both curves) redrawn at each save, after each
  evaluation and at the end (rank 0 only).

Not handled: TensorBoard/W&B (use ``report_to`` yourself). The validation loss itself is
computed by Trainer (`tutor.trainer`); this module only records and draws it.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tutor.chat import reply
from tutor.common import CONFIG_FILE, apply_umask, atomic_file, atomic_write
from tutor.data import with_system
from tutor.eval import format_table, score_files
from tutor.models import compute_dtype, keep_4bit_trainable
from tutor.runs import LOSS_PLOT, METRICS_FILE, PROGRESS_FILE
from tutor.train_config import TrainConfig, resolve_data_path, save_config

# Dense bf16 tensor-core peaks (FLOP/s) for the MFU estimate; unknown GPUs get no MFU.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


class EvaluateChatCallback(TrainerCallback):
    """Answer `cfg.evaluation.prompts` at step 0, every N steps and at the end."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.answers: dict[str, dict[int, str]] = {p: {} for p in cfg.evaluation.prompts}
        self.scores: dict[str, list] = {}  # "before"/"after" → tutor.eval.FileScore per file

    def _ask_all(self, model: Any, step: int, is_main: bool) -> None:
        if not self.answers:
            return
        ev = self.cfg.evaluation
        was_training = model.training
        model.eval()
        keep_4bit_trainable(model, was_training)  # why: tutor.trainer's docstring
        for prompt in self.answers:
            system = ev.system if ev.system is not None else self.cfg.system
            messages = with_system([{"role": "user", "content": prompt}], system)
            self.answers[prompt][step] = reply(
                model, self.tokenizer, messages, ev.max_new_tokens, self.cfg.template
            )
        model.train(was_training)
        if is_main:
            for prompt, by_step in self.answers.items():
                print(f"[eval step {step}] {prompt!r} → {by_step[step]!r}", flush=True)

    def _score_files(self, model: Any, when: str, is_main: bool) -> None:
        ev = self.cfg.evaluation
        if not ev.files:
            return
        paths = [resolve_data_path(f, "evaluation.files") for f in ev.files]
        self.scores[when] = score_files(model, self.tokenizer, self.cfg.template, paths,
                                        ev.max_new_tokens, system=self.cfg.system)
        if is_main:
            for s in self.scores[when]:
                print(f"[eval {when}] {s.path}: {s.to_json()}", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._ask_all(model, state.global_step, state.is_world_process_zero)
        self._score_files(model, "before", state.is_world_process_zero)

    def on_step_end(self, args, state, control, model=None, **kw):
        n = self.cfg.evaluation.every_n_steps
        if n > 0 and state.global_step % n == 0 and state.global_step < state.max_steps:
            self._ask_all(model, state.global_step, state.is_world_process_zero)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._ask_all(model, state.global_step, state.is_world_process_zero)
        self._score_files(model, "after", state.is_world_process_zero)
        if state.is_world_process_zero and self.answers:
            print(self.table(), flush=True)
        if state.is_world_process_zero and len(self.scores) == 2:
            print(format_table(self.scores), flush=True)

    def table(self) -> str:
        """A Markdown table: prompt | first answer | last answer."""
        rows = ["| prompt | before | after |", "| --- | --- | --- |"]
        for prompt, by_step in self.answers.items():
            steps = sorted(by_step)
            if steps:
                first, last = by_step[steps[0]], by_step[steps[-1]]
                rows.append(f"| {prompt} | {first} | {last} |".replace("\n", " "))
        return "\n".join(rows)


def flops_per_token(model: Any, full_finetune: bool) -> tuple[float, float]:
    """(FLOPs per processed token in the body, FLOPs per trained token in the head).

    Forward ≈ 2·N per token. Backward ≈ 4·N when weights are trained (input and weight
    grads), ≈ 2·N for LoRA (input grads only; adapters are negligible). Attention's
    L² term is left out (small at 512 tokens). The vocab head runs on trained positions.
    """
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    if hasattr(model, "get_nb_trainable_parameters"):  # peft counts 4-bit weights unpacked
        total = model.get_nb_trainable_parameters()[1]
    else:
        total = sum(p.numel() for p in model.parameters())
    tied = getattr(cfg, "tie_word_embeddings", False)
    body = total - head * (1 if tied else 2)  # embeddings are lookups, head counted apart
    factor = 6 if full_finetune else 4
    return factor * body, factor * head


def peak_flops() -> tuple[float, str]:
    """Peak FLOP/s for MFU: a known GPU's bf16 peak, or a measured CPU bf16/fp32 matmul."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 peak"
        return 0.0, f"{name}: peak unknown"

    dtype = compute_dtype()
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a  # warm-up
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        a @ a
        n += 1
    rate = n * 2 * 1024**3 / (time.perf_counter() - start)
    return rate, f"measured {str(dtype).removeprefix('torch.')} matmul on this CPU"


class ThroughputCallback(TrainerCallback):
    """Tokens per second and MFU over the optimizer steps of this session.

    The collator queues per-batch token counts as batches are built (the dataloader may
    build one ahead); each optimizer step pops the `grad_accum` batches it consumed.
    """

    def __init__(self, collator: Any, model: Any, resume_from: str | None = None) -> None:
        self.collator, self.resume_from = collator, resume_from
        self.body_flops, self.head_flops = flops_per_token(model, not hasattr(model, "peft_config"))
        self.counts: deque[tuple[int, int]] = deque()
        collator.on_batch = self.counts.append
        self.totals = {"all_tokens": 0, "trained_tokens": 0}
        self.session = {"all_tokens": 0, "trained_tokens": 0, "seconds": 0.0}
        self.peak, self.peak_source = 0.0, ""

    def on_train_begin(self, args, state, control, **kw):
        if self.resume_from and (Path(self.resume_from) / PROGRESS_FILE).is_file():
            self.totals = json.loads((Path(self.resume_from) / PROGRESS_FILE).read_text())
        self.peak, self.peak_source = peak_flops()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        for _ in range(min(args.gradient_accumulation_steps, len(self.counts))):
            all_tokens, trained = self.counts.popleft()
            for d in (self.totals, self.session):
                d["all_tokens"] += all_tokens
                d["trained_tokens"] += trained
        self.session["seconds"] = time.perf_counter() - self._start

    def summary(self) -> dict[str, float]:
        s, world = self.session, int(os.environ.get("WORLD_SIZE", "1"))
        secs = max(s["seconds"], 1e-9)
        flops = self.body_flops * s["all_tokens"] + self.head_flops * s["trained_tokens"]
        out = {
            "trained_tok_s": world * s["trained_tokens"] / secs,  # ranks see equal shares
            "all_tok_s": world * s["all_tokens"] / secs,
            "trained_tokens": world * self.totals["trained_tokens"],
            "all_tokens": world * self.totals["all_tokens"],
        }
        if self.peak:
            out["mfu"] = flops / secs / self.peak
        return out

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs:
            logs.update({k: round(v, 4) for k, v in self.summary().items()})

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            atomic_write(ckpt / PROGRESS_FILE, json.dumps(self.totals))


class MetricsCallback(TrainerCallback):
    """metrics.jsonl (one line per log), loss.png, and the config inside each checkpoint."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.output_dir) / METRICS_FILE

    def on_train_begin(self, args, state, control, **kw):
        # Resumed at step N: the lines a lost run wrote after its checkpoint N are redone
        # now, so drop them; the file then holds each step once.
        if state.is_world_process_zero and state.global_step > 0 and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            atomic_write(self.path, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:  # appending: resume continues it
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                save_config(self.cfg, ckpt / CONFIG_FILE)
                apply_umask(ckpt)  # safetensors writes 600: readable by the owner alone
            plot_loss(state.log_history, Path(args.output_dir) / LOSS_PLOT)

    def on_evaluate(self, args, state, control, **kw):
        if state.is_world_process_zero:  # the validation point appears as soon as it exists
            plot_loss(state.log_history, Path(args.output_dir) / LOSS_PLOT)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(state.log_history, Path(args.output_dir) / LOSS_PLOT)


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw training loss (and validation loss, where logged) against step into `path`.

    Preference runs (`tutor.preference_train`) also log reward margins and accuracies: they
    get a second panel (margin on the left axis, accuracy 0..1 on the right; validation
    points as circles). PNG, written atomically. Nothing is drawn (None) before the first
    loss is logged.
    """
    curves = _curves(log_history, "loss")
    if not any(curves.values()):
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend, no open figures

    margins = _curves(log_history, "rewards/margins")
    accuracies = _curves(log_history, "rewards/accuracies")
    preference = any(margins.values())
    fig = Figure(figsize=(5, 5.5 if preference else 3), dpi=100)
    axes = fig.subplots(2 if preference else 1, 1, sharex=True, squeeze=False)[:, 0]
    _draw(axes[0], curves, "")
    axes[0].set_ylabel("preference loss" if preference else "loss (answer tokens)")
    if preference:
        _draw(axes[1], margins, "margin, ")
        axes[1].set_ylabel("reward margin (chosen − rejected)")
        right = axes[1].twinx()
        _draw(right, accuracies, "accuracy, ", color="tab:green", linestyle="--")
        right.set_ylim(-0.05, 1.05)
        right.set_ylabel("preference accuracy")
        right.legend(loc="lower right", fontsize="small")
        axes[1].legend(loc="upper left", fontsize="small")
    axes[0].legend()
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _curves(log_history: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """Training and validation (``eval_`` + key) points of one logged statistic."""
    return {"training": [(h["step"], h[key]) for h in log_history if key in h],
            "validation": [(h["step"], h[f"eval_{key}"]) for h in log_history
                           if f"eval_{key}" in h]}


def _draw(ax: Any, curves: dict[str, list[tuple[int, float]]], label: str,
          color: str | None = None, linestyle: str = "-") -> None:
    for (name, points), marker in zip(curves.items(), (".", "o"), strict=True):
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=f"{label}{name}",
                    color=color, linestyle=linestyle)
    ax.grid(alpha=0.3)
