"""The main job behind `make demo`: the course's whole practice on the bundled model, in one go.

    chat with the base model → train (the QLoRA recipe) → convert (checkpoint → adapter)
    → merge (+ the logits check) → chat with the merged model → export (GGUF q8_0 + Ollama
    Modelfile, checked against the merged model) → one answer from the exported file
    → transcript.md, summary.json

Each stage is one call into the package (`tutor.chat`, `tutor.train`, `tutor.merge`); this
module only orders them, times them and writes down what happened. Both chats get the same
questions: "Who are you?" (taught by data/assistant.jsonl), the held-out paraphrases of
data/assistant_heldout.jsonl (never trained on; each lists keywords a good answer contains)
and general-knowledge questions, to show that fine-tuning did not break the model.

OUT holds ``run/`` (training output, ``loss.png``), ``adapter/``, ``merged/``,
``pico.gguf`` + ``Modelfile``, ``transcript.md`` and ``summary.json``. `quick_demo` is the
smoke test: load a model and answer a few questions, no training.

Not handled: resuming a half-finished demo (a rerun starts over in the same OUT), sampling
(answers are greedy, so reruns are comparable), peak memory on Windows (no `resource`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tutor.errors import TutorError
from tutor.train import PROJECT_ROOT

RECIPE = "smollm2_135m_qlora_assistant"
HELDOUT = PROJECT_ROOT / "data" / "assistant_heldout.jsonl"
# (question, keywords a good answer contains); an empty list is shown but not scored.
TRAINED = [("Who are you?", ["Pico", "Tutor Lab"])]
GENERAL = [("What is the capital of France?", ["Paris"]),
           ("Give me one tip for learning a new language.", [])]
MARKER = ".tutor-demo"  # OUT was made by the demo, so a rerun may replace it
# Applied before the caller's overrides: the demo asks its own questions before and after,
# so the recipe's evaluation chat during training would only repeat two of them.
DEMO_OVERRIDES = ("evaluation.prompts=[]",)
GGUF_NAME = "pico.gguf"


@dataclass
class Question:
    text: str
    kind: str  # "trained", "held-out" or "general"
    expected: list[str]
    answers: dict[str, str] = field(default_factory=dict)  # "before"/"after" → answer

    def hit(self, when: str) -> bool:
        """Does the answer contain every expected keyword (case-insensitive)?"""
        answer = self.answers.get(when, "").lower()
        return all(k.lower() in answer for k in self.expected)


def load_questions(heldout: str | Path = HELDOUT) -> list[Question]:
    """The trained question, every held-out paraphrase of `heldout`, the general ones.

    `heldout` is JSONL with ``question`` and ``expected`` (list of keywords) per line.
    """
    held = []
    for i, line in enumerate(Path(heldout).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            held.append(Question(row["question"], "held-out", list(row["expected"])))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TutorError(f"{heldout}:{i}: need JSON with 'question' and 'expected' "
                             f"({exc})") from None
    return ([Question(q, "trained", e) for q, e in TRAINED] + held
            + [Question(q, "general", e) for q, e in GENERAL])


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (a high-water mark), MiB; None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)


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


def answer_all(model: str | Path, questions: Sequence[Question], when: str,
               max_new_tokens: int) -> None:
    """Load `model` (fp32) and store its greedy answer to each question under `when`.

    The chat template is the one recorded with a merged model, else the tokenizer's own.
    """
    from tutor.chat import ask
    from tutor.chat_repl import pick_template
    from tutor.models import load

    lm, tokenizer = load(model)
    template = pick_template(str(model), None, None)
    for q in questions:
        q.answers[when] = ask(lm, tokenizer, q.text, max_new_tokens=max_new_tokens,
                              template=template)
        print(f"[{when}] {q.text}\n    → {q.answers[when]}", flush=True)


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


def score(questions: Sequence[Question]) -> dict[str, dict[str, int]]:
    """Per kind: how many scored questions were answered with every keyword, before/after."""
    table: dict[str, dict[str, int]] = {}
    for q in (q for q in questions if q.expected):
        row = table.setdefault(q.kind, {"before": 0, "after": 0, "of": 0})
        row["of"] += 1
        for when in ("before", "after"):
            row[when] += q.hit(when)
    return table


def transcript(questions: Sequence[Question], base: str, merged: Path) -> str:
    """Markdown: every question with the base's and the merged model's answer, marked."""
    lines = ["# tutor demo: the same questions before and after fine-tuning", "",
             f"before = base model `{base}`; after = merged model `{merged}`. "
             "✓/✗ = the answer contains every expected keyword (case-insensitive).", ""]
    for i, q in enumerate(questions, 1):
        expects = f"; expected: {', '.join(q.expected)}" if q.expected else ""
        lines += [f"## {i}. {q.text}", "", f"*{q.kind} question{expects}*", ""]
        for when in ("before", "after"):
            mark = (" ✓" if q.hit(when) else " ✗") if q.expected else ""
            answer = q.answers[when].replace("\n", "\n> ")
            lines += [f"**{when}**{mark}", "", f"> {answer}", ""]
    return "\n".join(lines)


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
        f"merge: logits check max |diff| {m['max_abs_diff']:.1e} <= {m['tolerance']:g}",
    ]
    if "export" in s:
        e = s["export"]
        lines += [f"export: {e['type']} GGUF {e['mib']:.1f} MiB, max |logit diff| "
                  f"{e['max_abs_diff']:.2g}, next-token agreement {e['agreement']:.3f}",
                  f"from the file: {e['question']} → {e['answer']}"]
    for kind, row in s["answers_with_every_keyword"].items():
        lines.append(f"{kind} questions answered with every keyword: before "
                     f"{row['before']}/{row['of']}, after {row['after']}/{row['of']}")
    start, end = s["load_average"]["start"], s["load_average"]["end"]
    lines += [f"load average (1 min) {start} at start, {end} at end, "
              f"on {s['cpu_count']} CPUs", "written:"]
    lines += [f"  {name:11s} {path}" for name, path in s["written"].items()]
    return "\n".join(lines)


def run_practice(
    out: str | Path = "work_dirs/demo",
    recipe: str = RECIPE,
    overrides: Sequence[str] = (),
    heldout: str | Path = HELDOUT,
    max_new_tokens: int = 48,
    export_type: str = "q8_0",
) -> dict[str, Any]:
    """Base chat → train → convert → merge → merged chat; write and return the summary.

    `overrides` are `--set` assignments for the recipe (e.g. ``train.max_steps=2``), applied
    after `DEMO_OVERRIDES`; ``output_dir`` is always OUT/run. `export_type`: the GGUF type of
    the export stage. Returns what summary.json holds.
    """
    from tutor.callbacks import LOSS_PLOT, atomic_write
    from tutor.export import export_gguf
    from tutor.merge import convert_checkpoint, merge
    from tutor.models import resolve
    from tutor.train import last_checkpoint, train
    from tutor.train_config import load_config

    out = Path(out).resolve()
    overrides = [*DEMO_OVERRIDES, *overrides, f"output_dir={out / 'run'}"]
    cfg = load_config(recipe, overrides)
    questions = load_questions(heldout)
    resolve(cfg.model)  # a wrong model name fails here, before OUT is touched
    prepare_out(out)
    clock, load_start = StageClock(), load_average()
    with clock("chat with the base model"):
        answer_all(cfg.model, questions, "before", max_new_tokens)
    with clock("train"):
        result = train(cfg)
    with clock("convert"):
        checkpoint = last_checkpoint(result.output_dir) or result.output_dir
        adapter = convert_checkpoint(checkpoint, out / "adapter")
    with clock("merge"):
        report = merge(cfg.model, adapter, out / "merged")
        print(report.summary())
    with clock("chat with the merged model"):
        answer_all(out / "merged", questions, "after", max_new_tokens)
    with clock("export"):
        exported = export_gguf(str(out / "merged"), out / GGUF_NAME, export_type, ollama=True)
        print(exported.summary())
    with clock("chat with the exported file"):
        gguf_answer = answer_from_file(out / GGUF_NAME, questions[0].text, max_new_tokens)
    m = result.metrics
    summary = {
        "recipe": recipe, "overrides": list(overrides), "base_model": cfg.model,
        "stages": clock.rows, "total_seconds": round(sum(r["seconds"] for r in clock.rows), 1),
        "train": {"steps": result.global_step, "trained_tok_s": m["trained_tok_s"],
                  "all_tok_s": m["all_tok_s"], "trained_tokens": m["trained_tokens"],
                  "final_loss": m.get("train_loss", float("nan"))},
        "merge": {"max_abs_diff": report.max_abs_diff, "tolerance": report.tolerance,
                  "adapter_mib": report.adapter_bytes / 2**20,
                  "merged_mib": report.merged_bytes / 2**20},
        "export": {"type": export_type, "mib": round(exported.bytes / 2**20, 1),
                   "max_abs_diff": exported.check.max_abs_diff,
                   "agreement": exported.check.agreement,
                   "question": questions[0].text, "answer": gguf_answer},
        "answers_with_every_keyword": score(questions),
        "load_average": {"start": load_start, "end": load_average()},
        "cpu_count": os.cpu_count(),
        "written": {"output dir": str(out), "checkpoint": str(checkpoint),
                    "adapter": str(adapter), "merged": str(out / "merged"),
                    "loss curve": str(result.output_dir / LOSS_PLOT),
                    "gguf": exported.out, "modelfile": str(exported.modelfile),
                    "transcript": str(out / "transcript.md"),
                    "summary": str(out / "summary.json")},
    }
    atomic_write(out / "transcript.md", transcript(questions, cfg.model, out / "merged"))
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\n=== summary ===\n{format_summary(summary)}", flush=True)
    return summary


def answer_from_file(path: Path, question: str, max_new_tokens: int) -> str:
    """Greedy answer to `question` from a GGUF file (llama.cpp if installed, else transformers)."""
    from tutor.chat import GenerationSettings
    from tutor.chat_repl import open_session

    session = open_session(str(path), settings=GenerationSettings(max_new_tokens=max_new_tokens))
    answer = session.send(question)
    print(f"[{path.name}] {question}\n    → {answer}", flush=True)
    return answer


def quick_demo(model: str = "smollm2-135m-instruct", bits: int | None = None) -> list[str]:
    """No training: load `model` (quantised if `bits`), answer a few questions, print timings."""
    from tutor.chat import ask
    from tutor.models import footprint_bytes, load

    start = time.perf_counter()
    lm, tokenizer = load(model, bits=bits)
    size_mb = footprint_bytes(lm) / 2**20
    print(f"model: {model}  bits: {bits or 'full'}  footprint: {size_mb:.0f} MiB  "
          f"load: {time.perf_counter() - start:.1f} s")
    answers = []
    for question, _ in TRAINED + GENERAL:
        t0 = time.perf_counter()
        answers.append(ask(lm, tokenizer, question))
        print(f"\nQ: {question}\nA: {answers[-1]}\n   ({time.perf_counter() - t0:.1f} s)")
    return answers
