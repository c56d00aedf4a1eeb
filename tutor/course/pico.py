"""Pico, the course's one finished model: trained in 06, merged in 07, chatted with in 08.

The assistant recipe (`smollm2_135m_qlora_assistant`) teaches the bundled SmolLM2-135M-Instruct
that it is Pico, made by the Tutor Lab. Training it takes minutes on a 2-core CPU, so it is done
once and cached under ``$TUTOR_HOME/runs/<recipe>-<key>/``::

    run/          the training output (adapter, checkpoint-N, metrics.jsonl, loss.png, result.json)
    scores.json   `tutor.eval` on the held-out identity questions and the forgetting probe,
                  base model (before) and base + adapter (after), fp32
    adapter/      `tutor.merge.convert_checkpoint` of the last checkpoint
    merged/       `tutor.merge.merge` of base + adapter (fp32, logits checked)

The key is a hash of what decides the weights: the resolved recipe (without its output_dir),
the bytes of every dataset it reads, and the versions of tutor, torch, transformers and peft.
Change any of them and the next call trains anew; a re-run with the same inputs loads the cached
files in seconds. Each notebook calls these functions, so it also runs alone in a fresh kernel.
Every stage is written to a temporary directory and renamed into place: an interrupted run
leaves no half-trained model behind.

Not handled: sharing the cache between machines (the key does not include the CPU, and bf16
and fp32 runs give slightly different weights), and evicting old runs (delete the folder).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor.common import CONFIG_FILE, atomic_dir, atomic_write
from tutor.demo import IDENTITY
from tutor.eval import FileScore, load_items, score_files, score_items
from tutor.merge import convert_checkpoint, merge
from tutor.models import load, tutor_home
from tutor.templates import get_template
from tutor.train import last_checkpoint, train
from tutor.train_config import ASSISTANT_RECIPE, load_config, resolve_data_path, to_yaml

RESULT_FILE = "result.json"  # global_step, metrics and seconds of the cached training run
# What the notebooks show themselves (answers, scores) is not also asked during training, and
# the log lines replace the progress bar; none of these changes the weights, so not the key.
QUIET = ("train.progress_bar=false", "evaluation.prompts=[]", "evaluation.files=[]")
SCORED = ("data/assistant_heldout.jsonl", "data/general_probe.jsonl")  # identity, probe
SCORE_TOKENS = 32  # new tokens per scored answer: enough for a keyword, short enough to be quick


@dataclass(frozen=True)
class Pico:
    """Where one cached Pico lives; `run` exists once `trained` returned."""

    root: Path
    recipe: str
    base_model: str

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def result(self) -> dict[str, Any]:
        """What training reported: ``global_step``, ``metrics`` (Trainer's + throughput)."""
        return json.loads((self.run / RESULT_FILE).read_text(encoding="utf-8"))


def digest(texts: Sequence[str], files: Sequence[str | Path]) -> str:
    """16 hex digits over `texts`, the bytes of `files` and the versions of tutor, torch,
    transformers and peft (what decides weights and answers besides the inputs)."""
    import peft
    import torch
    import transformers

    import tutor

    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
    for f in files:
        h.update(Path(f).read_bytes())
    for version in (tutor.__version__, torch.__version__, transformers.__version__,
                    peft.__version__):
        h.update(version.encode())
    return h.hexdigest()[:16]


def run_key(recipe: str = ASSISTANT_RECIPE, overrides: Sequence[str] = ()) -> str:
    """16 hex digits naming the weights that `recipe` + `overrides` produce here."""
    cfg = load_config(recipe, [*overrides, "output_dir=."])
    return digest([to_yaml(cfg)], [resolve_data_path(s.path) for s in cfg.data.datasets])


def locate(recipe: str = ASSISTANT_RECIPE, overrides: Sequence[str] = ()) -> Pico:
    """The cache folder of `recipe` + `overrides` (nothing is trained or created)."""
    base = load_config(recipe, list(overrides)).model
    return Pico(tutor_home() / "runs" / f"{recipe}-{run_key(recipe, overrides)}", recipe, base)


def trained(recipe: str = ASSISTANT_RECIPE, overrides: Sequence[str] = (), echo=print) -> Pico:
    """Pico with its training run done: from the cache, or trained now (minutes) and cached.

    `echo` gets one line saying which, with the training time.
    """
    pico = locate(recipe, overrides)
    if (pico.run / RESULT_FILE).is_file():
        took = pico.result()["seconds"]
        echo(f"Pico loaded from the cache ({pico.run}); training it took {took:.0f} s")
        return pico
    pico.root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(pico.run, force=True) as tmp:
        # The run trains in the temporary folder and is renamed only when it finished.
        cfg = load_config(recipe, [*overrides, *QUIET, f"output_dir={tmp}"])
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
        atomic_write(tmp / RESULT_FILE, json.dumps(
            {"global_step": result.global_step, "metrics": result.metrics, "seconds": seconds},
            indent=2) + "\n")
    echo(f"Pico trained in {seconds:.0f} s ({result.global_step} steps) and cached in {pico.run}")
    return pico


def merged(pico: Pico | None = None, echo=print) -> Pico:
    """Pico converted to an adapter and merged into its base (cached like the run).

    The same two calls as ``tutor convert`` and ``tutor merge`` (notebook 07 makes them
    itself); the merge checks the merged logits against base + adapter before it writes.
    """
    pico = pico or trained(echo=echo)
    if not pico.adapter.is_dir():
        convert_checkpoint(last_checkpoint(pico.run) or pico.run, pico.adapter)
    if not pico.merged.is_dir():
        report = merge(pico.base_model, pico.adapter, pico.merged)
        echo(report.summary())
    return pico


def scored(pico: Pico | None = None, echo=print) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"before"|"after": {file: {"hits", "total", "answer_loss", "identity_mentions"}}}``.

    `tutor.eval`'s scorer on `SCORED` for the base model (before) and for base + Pico's
    adapter (after), both fp32, greedy, `SCORE_TOKENS` new tokens, both under the recipe's
    system prompt (the same question asked the same way). "after" is cached as
    scores.json beside the run; "before" once per base model and template (every run of the
    same base shares it). An identity mention in a probe answer is over-reach: the fine-tune
    answering a question it was never about.
    """
    pico = pico or trained(echo=echo)
    cached = pico.root / "scores.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    cfg = load_config(pico.run / CONFIG_FILE)
    paths = [resolve_data_path(p) for p in SCORED]
    base, tokenizer = load(pico.base_model)
    key = [pico.base_model, cfg.template, str(SCORE_TOKENS), str(cfg.system)]
    before_file = pico.root.parent / f"base-scores-{digest(key, paths)}.json"
    if before_file.is_file():
        before = json.loads(before_file.read_text(encoding="utf-8"))
    else:
        before = _score(base, tokenizer, cfg.template, paths, cfg.system)
        atomic_write(before_file, json.dumps(before, indent=2) + "\n")
    from peft import PeftModel

    after = _score(PeftModel.from_pretrained(base, pico.run), tokenizer, cfg.template, paths,
                   cfg.system)
    scores = {"before": before, "after": after}
    atomic_write(cached, json.dumps(scores, indent=2) + "\n")
    return scores


def score(model: Any, tokenizer: Any, pico: Pico) -> dict[str, dict[str, Any]]:
    """`scored`'s numbers for any `model` (notebook 07 compares merges with the trained
    model): `SCORED` asked with the run's template and system prompt, not cached."""
    cfg = load_config(pico.run / CONFIG_FILE)
    return _score(model, tokenizer, cfg.template, [resolve_data_path(p) for p in SCORED],
                  cfg.system)


def answer_losses(model: Any, tokenizer: Any, pico: Pico) -> dict[str, float]:
    """``{file: token-weighted answer loss}`` on the reference answers of `SCORED`, asked
    with the run's template and system prompt: the scorer's loss column without its greedy
    answers (seconds, so notebook 06 can score every kept checkpoint)."""
    from dataclasses import replace

    cfg = load_config(pico.run / CONFIG_FILE)
    template = get_template(cfg.template, tokenizer=tokenizer)
    out = {}
    for name in SCORED:
        items = [replace(i, expected=[]) for i in load_items(resolve_data_path(name), cfg.system)
                 if i.reference]  # no keywords: nothing is generated
        out[name] = FileScore(name, score_items(model, tokenizer, template, items)).answer_loss
    return out


def prompt_logits(model: Any, tokenizer: Any, pico: Pico) -> Any:
    """fp32 logits at every position of every `SCORED` prompt (run's template and system
    prompt, generation prompt added), stacked: (positions, vocab). Notebook 07 compares
    models on them."""
    import torch

    cfg = load_config(pico.run / CONFIG_FILE)
    template = get_template(cfg.template, tokenizer=tokenizer)
    rows = []
    for name in SCORED:
        for item in load_items(resolve_data_path(name), cfg.system):
            text = template.render(item.prompt, add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                rows.append(model(**ids).logits[0].float())  # (T, V)
    return torch.cat(rows)


def _score(model: Any, tokenizer: Any, template: str, paths: Sequence[str],
           system: str | None) -> dict[str, Any]:
    files = score_files(model, tokenizer, template, paths, SCORE_TOKENS, system=system)
    return {name: {**f.to_json(), "identity_mentions": f.mentions(IDENTITY)}
            for name, f in zip(SCORED, files, strict=True)}
