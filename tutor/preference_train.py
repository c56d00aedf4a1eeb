"""DPO / ORPO training on packed preference pairs, with the policy's own reference.

`tutor.train.train` calls into this module when a recipe says ``method: dpo | orpo``:

- `build_pair_dataset`: pair files (`tutor.data.load_pairs`) → `encode_pair` → packs of
  pairs (`tutor.packing.pack_pairs`: the prompt once, both answers continuing it) and a
  collator that adds ``pair_ids``. Validation pairs are held out exactly as in SFT
  (`tutor.recipe_data.split_datasets`).
- `load_policy_adapter`: an existing adapter (``init_adapter``) as the trainable policy and,
  for DPO, a frozen copy of it named ``reference``.
- `PreferenceTrainer`: per batch, the reference forward under ``torch.no_grad()`` (the
  same model: the ``reference`` adapter switched in, or the adapter disabled when training
  starts from a fresh LoRA), then the policy forward, each with logits kept only where a
  trained token is predicted; the loss and rewards of `tutor.preference`. The rewards are
  logged like TRL's (``rewards/chosen|rejected|margins|accuracies``, ``eval_`` prefixed for
  validation), averaged over the pairs since the last log line.

Why no second model: a LoRA policy differs from its reference only by the adapter, so the
reference is the same weights with the adapter off (fresh LoRA: B = 0 makes it the base) or
a copy of the starting adapter (adapter-size memory). The reference costs one no-grad
forward per step.

Not handled: full fine-tuning (there is no adapter to switch off: a recipe without ``lora``
is refused), DeepSpeed ZeRO-3 state dicts when saving with a reference adapter, the chunked
vocabulary head (`tutor.chunked_loss`; off for preference), precomputed reference log-probs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.data import encode_pairs, load_pairs, with_system_prompts
from tutor.errors import TutorError
from tutor.packing import PackCollator, PackedDataset, pack_pairs
from tutor.preference import REWARD_KEYS, answer_logps, dpo_loss, orpo_loss
from tutor.recipe_data import check_max_length, split_datasets, weighted
from tutor.train_config import list_recipes, load_config
from tutor.trainer import ValidationTrainer

if TYPE_CHECKING:
    import torch

    from tutor.train_config import TrainConfig

REFERENCE = "ref"  # the frozen copy of the starting adapter (TRL's name, `ref_adapter_name`)


def check_recipe(cfg: TrainConfig) -> None:
    """Refuse, in one line and before the model loads, what preference training cannot do:
    no adapter to switch off (full fine-tuning), attention that cannot share the prompt
    (flash-attention), a missing init_adapter."""
    if cfg.lora is None:
        raise TutorError(f"method: {cfg.method} needs a lora section: the reference is the "
                         "model with its adapter off (full fine-tuning would need a second "
                         "copy of the model)")
    if cfg.attn_implementation == "flash_attention_2":
        raise TutorError("attn_implementation: pairs share their prompt, which "
                         "flash_attention_2 cannot see; use sdpa_varlen, sdpa or eager")
    if cfg.init_adapter:
        find_adapter(cfg.init_adapter)


# ---------------------------------------------------------------- the reference


def find_adapter(path: str) -> Path:
    """The adapter directory `path` names (an adapter dir, a run's output_dir or one of its
    checkpoints all hold adapter_config.json), or a one-line TutorError saying how to make it.
    """
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        return p
    makers = [n for n in list_recipes() if Path(load_config(n).output_dir) == Path(path)]
    fix = (f"train it first: tutor train {makers[0]}" if makers
           else "point init_adapter at a directory with adapter_config.json")
    raise TutorError(f"init_adapter: no adapter in '{path}' (no adapter_config.json); {fix}")


def load_policy_adapter(model: Any, path: str, reference: bool) -> Any:
    """`model` (the base) wrapped with the adapter at `path`, trainable, as peft's "default";
    with `reference`, a second, frozen copy named `REFERENCE` (dropout off) for DPO."""
    import dataclasses

    from peft import PeftModel

    where = find_adapter(path)
    model = PeftModel.from_pretrained(model, str(where), is_trainable=True)
    if reference:
        config = dataclasses.replace(model.peft_config["default"], lora_dropout=0.0,
                                     inference_mode=True)
        model.add_adapter(REFERENCE, config)
        params = dict(model.named_parameters())
        for name, param in params.items():
            if f".{REFERENCE}." in name:
                param.data.copy_(params[name.replace(f".{REFERENCE}.", ".default.")].data)
                param.requires_grad_(False)
    return model


@contextmanager
def reference_of(model: Any) -> Iterator[None]:
    """Within the block `model` computes the reference: the `REFERENCE` adapter when there
    is one, else the model with its adapters disabled. Use under ``torch.no_grad()``."""
    if REFERENCE not in getattr(model, "peft_config", {}):
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(REFERENCE)  # peft flips requires_grad: reference on, default off
    try:
        yield
    finally:
        model.set_adapter(previous)
        for name, param in model.named_parameters():  # frozen again, whatever set_adapter did
            if f".{REFERENCE}." in name:
                param.requires_grad_(False)


# ---------------------------------------------------------------- the loss


def preference_loss(model: Any, batch: dict[str, torch.Tensor], method: str, beta: float,
                    loss_type: str, orpo_lambda: float) -> dict[str, torch.Tensor]:
    """The loss of one collated pair batch and its per-pair statistics (`tutor.preference`)."""
    import torch

    n = int(batch["pair_ids"].max()) // 2 + 1
    if method == "dpo":
        with torch.no_grad(), reference_of(model):
            ref, _ = answer_logps(model, batch, n)
    sums, counts = answer_logps(model, batch, n)
    if method == "orpo":
        return orpo_loss(sums[0::2], sums[1::2], counts[0::2], counts[1::2], orpo_lambda)
    return dpo_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2], beta, loss_type,
                    counts[0::2], counts[1::2])


class PreferenceTrainer(ValidationTrainer):
    """`ValidationTrainer` whose loss is DPO or ORPO on pair batches (module docstring).

    The loss is the mean over the pairs of a micro-batch; Trainer divides it by the
    gradient-accumulation steps (``loss_is_scaled_for_ga = False``).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, method: str = "dpo", beta: float = 0.1,
                 loss_type: str = "sigmoid", orpo_lambda: float = 0.1, **kwargs: Any) -> None:
        if method not in ("dpo", "orpo"):
            raise TutorError(f"method: {method!r} is not a preference method (dpo, orpo)")
        super().__init__(*args, **kwargs)
        self.method, self.beta, self.loss_type, self.orpo_lambda = (method, beta, loss_type,
                                                                     orpo_lambda)
        # mode → statistic → [sum over pairs, number of pairs] since the last log line
        self._stats: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = preference_loss(model, inputs, self.method, self.beta, self.loss_type,
                              self.orpo_lambda)
        stats = self._stats["train" if model.training else "eval"]
        for key in (*REWARD_KEYS, "nll_loss"):
            if key in out:
                value = out[key]
                total = stats.setdefault(key, [0.0, 0])
                total[0] += float(value.sum())
                total[1] += value.numel()
        return (out["loss"], {"loss": out["loss"]}) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None:
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": round(s / n, 6)
                         for k, (s, n) in self._stats[mode].items() if n})
            self._stats[mode] = {}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """Save only the trained adapter: the reference copy stays out of the run's files,
        so `tutor convert` / `tutor merge` see one adapter as after SFT."""
        model = self.accelerator.unwrap_model(self.model)
        if REFERENCE not in getattr(model, "peft_config", {}):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            model.save_pretrained(output_dir or self.args.output_dir,
                                  selected_adapters=[model.active_adapter])
        return None


# ---------------------------------------------------------------- the data


def load_pair_samples(cfg: TrainConfig, tokenizer: Any, split: str = "train",
                      ) -> tuple[list[dict], list]:
    """Encoded pairs (`tutor.data.encode_pairs`) of the recipe's `split`, weighted like SFT
    samples (`tutor.recipe_data.split_datasets`, `weighted`), and one PairReport per
    file, each prompt opened by the recipe's ``system:`` (as in SFT). ([], []) without
    validation."""
    check_max_length(cfg, tokenizer)
    rng = random.Random(cfg.train.seed)
    encoded: list[dict] = []
    reports = []
    for _, weight, pairs in split_datasets(cfg, split, load_pairs):
        pairs = with_system_prompts(pairs, cfg.system)
        rows, report = encode_pairs(pairs, tokenizer, cfg.template, cfg.data.max_length)
        encoded += weighted(rows, weight, rng)
        reports.append(report)
    return encoded, reports


def build_pair_dataset(cfg: TrainConfig, tokenizer: Any, attn_implementation: str = "sdpa",
                       mask_dtype: torch.dtype | None = None, split: str = "train"):
    """(dataset of pair packs, collator, PairReport per file) for `cfg`'s split, shaped like
    `tutor.train.build_dataset`'s result; the dataset is None when the split is empty."""
    pairs, reports = load_pair_samples(cfg, tokenizer, split)
    dataset = PairPacks(pairs, cfg.data.max_length, cfg.data.packing, seed=cfg.train.seed,
                        reshuffle=split == "train") if pairs else None
    # keep_logits stays off: the preference loss picks its own positions (keep_positions)
    collator = PackCollator(attn_implementation, tokenizer.pad_token_id, mask_dtype)
    return dataset, collator, reports


class PairPacks(PackedDataset):
    """`PackedDataset` of pairs (`tutor.packing.pack_pairs`), re-packed each epoch;
    ``packing: none`` puts each pair in a pack of its own."""

    def _pack(self, seed: int) -> Any:
        if self.strategy == "none":
            return [pack for pair in self.samples
                    for pack in pack_pairs([pair], self.max_length)]
        return pack_pairs(self.samples, self.max_length, self.strategy, seed)
