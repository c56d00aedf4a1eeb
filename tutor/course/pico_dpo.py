"""Pico after preference tuning (notebook 10): the DPO run from the cached SFT Pico, what it
changed on held-out pairs and answers, and the same batch through TRL's DPOTrainer.

    sft = pico.trained()                        # notebook 06's Pico (cached)
    dpo = pico_dpo.trained(sft)                 # smollm2_135m_dpo_pico, init_adapter = sft.run
    pico_dpo.measured(sft)["accuracy"]          # held-out preference accuracy of the SFT Pico

`trained` caches like `tutor.course.pico.trained` (same folder layout, same key rules): the
resolved recipe names the SFT run's folder, whose name holds the SFT key, so a new SFT Pico
trains a new DPO Pico. `measured` caches its numbers beside a run, in a file named for the
held-out pairs' bytes (new pairs, new numbers): held-out preference accuracy
(`tutor.eval.preference_accuracy`, summed log-probs as DPO scores them) and greedy answers to the
held-out pairs' prompts, with how many of them admit a limit (`LIMIT`) and their lengths.

Pico's pairs (data/pico_pairs.jsonl) teach one behaviour SFT never showed: to say what it cannot
know or do (the time, live prices, the user's own facts, the future, acting in the world) rather
than make up a confident answer. `LIMIT` is the keyword test of that on a generated answer.

Not handled: any recipe but the shipped DPO one's base and template (the answers are asked with
the run's recorded template), and sampling (answers are greedy so runs compare).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tutor.common import CONFIG_FILE, atomic_write
from tutor.course import pico
from tutor.course.pico import Pico

RECIPE = "smollm2_135m_dpo_pico"
HELDOUT = "data/pico_pairs_heldout.jsonl"  # 20 pairs never trained on
ANSWER_TOKENS = 64  # room for an answer to show what it does; a short one ends far sooner
# An answer "admits a limit" when it says it cannot know or do something: the behaviour the
# chosen answers show. Wider than their exact wording, so a paraphrase counts too.
LIMIT = re.compile(r"\b(can't|cannot|can not|don't know|do not know|unable|not able|"
                   r"don't have|do not have|no access|no way)\b", re.IGNORECASE)


def locate(sft: Pico | None = None, overrides: Sequence[str] = ()) -> Pico:
    """The cache folder of the DPO recipe + `overrides` from `sft` (default: the shipped SFT
    Pico's folder); nothing is trained or created."""
    sft = sft or pico.locate()
    return pico.locate(RECIPE, [f"init_adapter={sft.run}", *overrides])


def trained(sft: Pico | None = None, overrides: Sequence[str] = (), echo=print) -> Pico:
    """The DPO Pico (or, with ``method=orpo`` in `overrides`, the ORPO one) trained from the
    SFT Pico's adapter: from the cache, or trained now and cached."""
    sft = sft or pico.trained(echo=echo)
    return pico.trained(RECIPE, [f"init_adapter={sft.run}", *overrides], echo)


def measured_file(run: Pico) -> Path:
    """Where `measured` caches `run`'s numbers: named for the held-out file's bytes."""
    from tutor.train_config import resolve_data_path

    key = pico.digest([str(ANSWER_TOKENS)], [resolve_data_path(HELDOUT)])
    return run.root / f"measured-{key}.json"


def measured(run: Pico) -> dict[str, Any]:
    """``{"accuracy", "mean_margin", "token_accuracy", "mean_token_margin", "pairs",
    "prompts", "answers", "admits", "tokens", "words"}`` of base + `run`'s adapter (fp32,
    greedy, `ANSWER_TOKENS` new tokens, the run's template and system prompt); ``admits`` holds
    one bool per answer (`LIMIT` found). Cached in `run`'s folder as
    measured-<digest of the held-out file>.json."""
    cached = measured_file(run)
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    from peft import PeftModel

    from tutor.chat import reply_batch
    from tutor.data import load_pairs, with_system_prompts
    from tutor.eval import preference_accuracy
    from tutor.models import load
    from tutor.templates import get_template
    from tutor.train_config import load_config, resolve_data_path

    path = resolve_data_path(HELDOUT)
    base, tokenizer = load(run.base_model)
    model = PeftModel.from_pretrained(base, run.run).eval()
    cfg = load_config(run.run / CONFIG_FILE)
    template = get_template(cfg.template, tokenizer=tokenizer)
    score = preference_accuracy(model, tokenizer, path, template, system=cfg.system)
    prompts = with_system_prompts(load_pairs(path), cfg.system)["prompt"]
    answers = reply_batch(model, tokenizer, prompts, ANSWER_TOKENS, template)
    out = {**score.to_json(), "prompts": [p[-1]["content"] for p in prompts], "answers": answers,
           "admits": [bool(LIMIT.search(a)) for a in answers],
           "tokens": [len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers],
           "words": [len(a.split()) for a in answers]}
    atomic_write(cached, json.dumps(out, indent=2) + "\n")
    return out


def trl_dpo_batch(policy: Pico, reference: Pico, rows: Sequence[tuple[str, str, str]],
                  beta: float, workdir: str, system: str | None = None,
                  ) -> tuple[Any, dict[str, float], list[dict]]:
    """TRL's DPOTrainer on `rows` (prompt, chosen, rejected; the prompt opened by `system`):
    its loss and mean rewards with `reference`'s adapter as its frozen reference and
    `policy`'s weights as the policy.

    Returns (the peft model TRL holds: adapters "default" = policy and "ref" = reference, fp32,
    eval mode), TRL's ``{"loss", "rewards/..."}`` and the pairs in TRL's own tokens as
    `tutor.data.encode_pair` returns them (so tutor can score exactly the same tokens).
    """
    import datasets
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tutor.common import IGNORE_INDEX
    from tutor.data import with_system
    from tutor.models import load

    base, tokenizer = load(policy.base_model)
    model = PeftModel.from_pretrained(base, reference.run, is_trainable=True)
    data = datasets.Dataset.from_list([
        {"prompt": with_system([{"role": "user", "content": q}], system),
         "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]} for q, c, r in rows])
    args = DPOConfig(output_dir=workdir, use_cpu=True, beta=beta, loss_type=["sigmoid"],
                     max_length=None, precompute_ref_log_probs=False, report_to=[], bf16=False,
                     per_device_train_batch_size=len(rows))
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    # TRL copied the reference adapter as "ref"; the policy now takes the DPO weights.
    weights = load_file(str(policy.run / "adapter_model.safetensors"))
    set_peft_model_state_dict(trainer.model, weights, adapter_name="default")
    trainer.model.eval()
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    loss = trainer.compute_loss(trainer.model, batch)
    # in eval mode TRL logs the batch's rewards under "eval" (no dropout either way: r=16, 0.0)
    trl = {"loss": loss.item(), **{k: v[-1] for k, v in trainer._metrics["eval"].items()
                                   if k.startswith("rewards/")}}
    # TRL's tokens, prompt then answer; labels on the answer only, as tutor trains them
    pairs = [{side: {"input_ids": e["prompt_ids"] + e[f"{side}_ids"],
                     "labels": [IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_ids"]}
              for side in ("chosen", "rejected")} | {"prompt_length": len(e["prompt_ids"]) - 1}
             for e in examples]
    return trainer.model, trl, pairs
