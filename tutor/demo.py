"""The main job behind `make demo`: the course's whole practice on the bundled model, in one go.

    score the base model → train (the QLoRA recipe) → convert (checkpoint → adapter)
    → merge (+ the logits check) → score the merged model → export (GGUF q8_0 + Ollama
    Modelfile, checked against the merged model) → one answer from the exported file
    → transcript.md, summary.json

Each stage is one call into the package (`tutor.chat`, `tutor.train`, `tutor.merge`); this
module only orders them, times them and writes down what happened. Both models are scored
by the same scorer (`tutor.eval`, as `tutor eval` does) on two files: the held-out identity
paraphrases of data/assistant_heldout.jsonl (never trained on) and the forgetting probe
data/general_probe.jsonl (general-knowledge questions unrelated to the identity; both in
tutor/configs/). Each
question lists keywords a good answer contains; each has a reference answer whose loss
is measured. Probe answers that name the identity ("Pico", "Tutor Lab") count as
over-reach: the fine-tune answering questions it was never about.

OUT holds ``run/`` (training output, ``loss.png``), ``adapter/``, ``merged/``,
``transcript.md`` and ``summary.json``. `quick_demo` is the smoke test: load a model and
answer a few questions, no training.

Not handled: resuming a half-finished demo (a rerun starts over in the same OUT), sampling
(answers are greedy, so reruns are comparable), peak memory on Windows (no `resource`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.chat import GenerationSettings, ask, open_session
from tutor.common import atomic_write
from tutor.errors import TutorError
from tutor.eval import evaluate, load_items
from tutor.export import export_gguf
from tutor.export.check import QUESTIONS as QUICK_QUESTIONS  # also what exports are checked on
from tutor.measure import peak_rss_bytes
from tutor.merge import convert_checkpoint, merge
from tutor.models import footprint_bytes, load, resolve
from tutor.runs import LOSS_PLOT
from tutor.train import last_checkpoint, train
from tutor.train_config import ASSISTANT_RECIPE, DATA_DIR, load_config

if TYPE_CHECKING:
    from tutor.eval import FileScore

HELDOUT = DATA_DIR / "assistant_heldout.jsonl"
PROBE = DATA_DIR / "general_probe.jsonl"
# Words of the taught identity: in an answer to a probe question they are over-reach.
IDENTITY = ("Pico", "Tutor Lab")
MARKER = ".tutor-demo"  # OUT was made by the demo, so a rerun may replace it
# Applied before the caller's overrides: the demo scores its own files before and after,
# so the recipe's evaluation during training would only repeat that work.
DEMO_OVERRIDES = ("evaluation.prompts=[]", "evaluation.files=[]")
GGUF_NAME = "pico.gguf"


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (a high-water mark), MiB; None on Windows."""
    try:
        return round(peak_rss_bytes() / 2**20, 1)
    except ImportError:  # no /proc and no `resource` module
        return None


def load_average() -> float | None:
    """The 1-minute load average: how busy the CPUs were (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class StageClock:
    """Times named stages; after each, records the peak RSS reached so far."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        yield
        self.rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 1),
                          "peak_rss_mib": peak_rss_mib()})


def prepare_out(out: Path) -> Path:
    """An empty OUT owned by the demo. A previous demo's OUT (it holds MARKER) is replaced;
    any other non-empty path is refused, so the demo never deletes what it did not write."""
    if out.exists():
        ours = out.is_dir() and (out / MARKER).is_file()
        if not (ours or (out.is_dir() and not any(out.iterdir()))):
            raise TutorError(f"{out} exists and is not a previous demo's output; "
                             "pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by `tutor demo`; a rerun replaces this directory\n")
    return out


def score_table(before: list[FileScore], after: list[FileScore]) -> dict[str, Any]:
    """Per file: hits, total and answer loss before and after, and identity mentions."""
    return {
        b.path: {"before": {**b.to_json(), "identity_mentions": b.mentions(IDENTITY)},
                 "after": {**a.to_json(), "identity_mentions": a.mentions(IDENTITY)}}
        for b, a in zip(before, after, strict=True)
    }


def transcript(before: list[FileScore], after: list[FileScore], base: str,
               merged: Path) -> str:
    """Markdown: every asked question with the base's and the merged model's answer."""
    lines = ["# tutor demo: the same questions before and after fine-tuning", "",
             f"before = base model `{base}`; after = merged model `{merged}`. "
             "✓/✗ = the answer contains every expected keyword (case-insensitive).", ""]
    n = 0
    for fb, fa in zip(before, after, strict=True):
        lines += [f"## {Path(fb.path).name}", ""]
        for sb, sa in zip(fb.items, fa.items, strict=True):
            if sb.answer is None:
                continue
            n += 1
            lines += [f"### {n}. {sb.item.prompt[-1]['content']}", "",
                      f"*expected: {', '.join(sb.item.expected)}*", ""]
            for when, s in (("before", sb), ("after", sa)):
                answer = (s.answer or "").replace("\n", "\n> ")
                lines += [f"**{when}** {'✓' if s.hit else '✗'}", "", f"> {answer}", ""]
    return "\n".join(lines)


def _loss(score: dict[str, Any]) -> str:
    return "n/a" if score["answer_loss"] is None else f"{score['answer_loss']:.3f}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary printed at the end of the demo (a subset of summary.json)."""
    lines = [f"{'stage':28s} {'seconds':>8s} {'peak RSS':>10s}"]
    for row in s["stages"]:
        rss = f"{row['peak_rss_mib']:.0f} MiB" if row["peak_rss_mib"] is not None else "n/a"
        lines.append(f"{row['stage']:28s} {row['seconds']:8.1f} {rss:>10s}")
    t, m = s["train"], s["merge"]
    lines += [
        f"{'total':28s} {s['total_seconds']:8.1f}", "",
        f"train: {t['steps']} steps, {t['trained_tok_s']:.0f} trained tok/s "
        f"({t['all_tok_s']:.0f} all), final loss {t['final_loss']:.4f}",
        *([f"validation loss {t['validation_loss'][0][1]:.4f} at step 0 -> "
           f"{t['validation_loss'][-1][1]:.4f} at step {t['validation_loss'][-1][0]}, "
           f"lowest {min(v for _, v in t['validation_loss']):.4f}"]
          if t.get("validation_loss") else []),
        f"merge: logits check max |diff| {m['max_abs_diff']:.1e} <= {m['tolerance']:g}",
    ]
    for path, row in s["scores"].items():
        b, a = row["before"], row["after"]
        lines.append(f"{Path(path).name}: hits {b['hits']}/{b['total']} -> "
                     f"{a['hits']}/{a['total']}, answer loss {_loss(b)} -> {_loss(a)}, "
                     f"answers naming {' / '.join(IDENTITY)} {b['identity_mentions']} -> "
                     f"{a['identity_mentions']}")
    if "export" in s:
        e = s["export"]
        lines += [f"export: {e['type']} GGUF {e['mib']:.1f} MiB, max |logit diff| "
                  f"{e['max_abs_diff']:.2g}, next-token agreement {e['agreement']:.3f}",
                  f"from the file: {e['question']} → {e['answer']}"]
    start, end = s["load_average"]["start"], s["load_average"]["end"]
    lines += [f"load average (1 min) {start} at start, {end} at end, "
              f"on {s['cpu_count']} CPUs", "written:"]
    lines += [f"  {name:11s} {path}" for name, path in s["written"].items()]
    return "\n".join(lines)


def run_practice(
    out: str | Path = "work_dirs/demo",
    recipe: str = ASSISTANT_RECIPE,
    overrides: Sequence[str] = (),
    heldout: str | Path = HELDOUT,
    probe: str | Path = PROBE,
    max_new_tokens: int = 48,
    export_type: str = "q8_0",
) -> dict[str, Any]:
    """Score base → train → convert → merge → score merged; write and return the summary.

    `overrides` are `--set` assignments for the recipe (e.g. ``train.max_steps=2``), applied
    after `DEMO_OVERRIDES`; ``output_dir`` is always OUT/run. `export_type`: the GGUF type of
    the export stage. Returns what summary.json holds.
    """
    out = Path(out).resolve()
    overrides = [*DEMO_OVERRIDES, *overrides, f"output_dir={out / 'run'}"]
    cfg = load_config(recipe, overrides)
    files = [str(heldout), str(probe)]
    for path in files:  # a broken file fails here, before OUT is touched
        load_items(path)
    resolve(cfg.model)  # a wrong model name fails here, before OUT is touched
    prepare_out(out)
    clock, load_start = StageClock(), load_average()
    with clock("score the base model"):
        before = evaluate(cfg.model, files, max_new_tokens=max_new_tokens, echo=True)
    with clock("train"):
        result = train(cfg)
    with clock("convert"):
        checkpoint = last_checkpoint(result.output_dir) or result.output_dir
        adapter = convert_checkpoint(checkpoint, out / "adapter")
    with clock("merge"):
        report = merge(cfg.model, adapter, out / "merged")
        print(report.summary())
    with clock("score the merged model"):
        after = evaluate(str(out / "merged"), files, max_new_tokens=max_new_tokens,
                         echo=True)
    with clock("export"):
        exported = export_gguf(str(out / "merged"), out / GGUF_NAME, export_type, ollama=True)
        print(exported.summary())
    question = "Who are you?"
    with clock("chat with the exported file"):
        gguf_answer = answer_from_file(out / GGUF_NAME, question, max_new_tokens)
    m = result.metrics
    summary = {
        "recipe": recipe, "overrides": list(overrides), "base_model": cfg.model,
        "stages": clock.rows, "total_seconds": round(sum(r["seconds"] for r in clock.rows), 1),
        "train": {"steps": result.global_step, "trained_tok_s": m["trained_tok_s"],
                  "all_tok_s": m["all_tok_s"], "trained_tokens": m["trained_tokens"],
                  "final_loss": m.get("train_loss", float("nan")),
                  "validation_loss": [[h["step"], h["eval_loss"]] for h in result.log_history
                                      if "eval_loss" in h]},
        "merge": {"max_abs_diff": report.max_abs_diff, "tolerance": report.tolerance,
                  "adapter_mib": report.adapter_bytes / 2**20,
                  "merged_mib": report.merged_bytes / 2**20},
        "scores": score_table(before, after),
        "export": {"type": export_type, "mib": round(exported.bytes / 2**20, 1),
                   "max_abs_diff": exported.check.max_abs_diff,
                   "agreement": exported.check.agreement,
                   "question": question, "answer": gguf_answer},
        "load_average": {"start": load_start, "end": load_average()},
        "cpu_count": os.cpu_count(),
        "written": {"output dir": str(out), "checkpoint": str(checkpoint),
                    "adapter": str(adapter), "merged": str(out / "merged"),
                    "loss curve": str(result.output_dir / LOSS_PLOT),
                    "gguf": exported.out, "modelfile": str(exported.modelfile),
                    "transcript": str(out / "transcript.md"),
                    "summary": str(out / "summary.json")},
    }
    atomic_write(out / "transcript.md", transcript(before, after, cfg.model, out / "merged"))
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\n=== summary ===\n{format_summary(summary)}", flush=True)
    return summary


def answer_from_file(path: Path, question: str, max_new_tokens: int) -> str:
    """Greedy answer to `question` from a GGUF file (llama.cpp if installed, else transformers)."""
    session = open_session(str(path), settings=GenerationSettings(max_new_tokens=max_new_tokens))
    answer = session.send(question)
    print(f"[{path.name}] {question}\n    → {answer}", flush=True)
    return answer


def quick_demo(model: str = "smollm2-135m-instruct", bits: int | None = None) -> list[str]:
    """No training: load `model` (quantised if `bits`), answer a few questions, print timings."""
    start = time.perf_counter()
    lm, tokenizer = load(model, bits=bits)
    size_mb = footprint_bytes(lm) / 2**20
    print(f"model: {model}  bits: {bits or 'full'}  footprint: {size_mb:.0f} MiB  "
          f"load: {time.perf_counter() - start:.1f} s")
    answers = []
    for question in QUICK_QUESTIONS:
        t0 = time.perf_counter()
        answers.append(ask(lm, tokenizer, question))
        print(f"\nQ: {question}\nA: {answers[-1]}\n   ({time.perf_counter() - t0:.1f} s)")
    return answers
