"""One-command LoRA/QLoRA/full fine-tuning on `transformers.Trainer`.

The flow is plain function calls, each one step of the course::

    cfg = load_config("smollm2_135m_qlora_assistant", ["train.max_steps=20"])
    model, tokenizer = build_model(cfg)          # tutor.models.load + peft (+ bitsandbytes)
    dataset, collator = build_dataset(cfg, tokenizer)  # tutor.data → tutor.packing
    result = train(cfg)                          # all of the above + Trainer + callbacks

Speed choices (CPU first): bf16 autocast when the CPU has bf16 instructions, packing
with exact per-sample isolation (attention over each sample's own span: flash-attn's varlen
kernel on a GPU, `tutor.attention.sdpa_varlen` elsewhere), no gradient checkpointing unless
asked, and the loss computed only at positions whose next token is trained
(`tutor.packing.PackCollator`), by default in chunks of rows that never hold the
[tokens, vocab] logits (`tutor.chunked_loss`, `train.chunked_loss`); both leave the loss
unchanged (tests/test_train.py, tests/test_chunked_loss.py compare it with the model's own).

Validation (``data.validation``: a file, or a seeded fraction of each dataset held out
before packing) is packed and collated like the training data and evaluated by Trainer's
own loop (`tutor.trainer`): ``eval_loss`` before training, every ``train.eval_steps``
and at the end, in metrics.jsonl and loss.png beside the training loss.

Preference tuning (``method: dpo | orpo``) takes the same road with pair files: the
datasets and the validation split are read by `tutor.data.load_pairs`, packed with the
prompt once per pair (`tutor.preference_train.build_pair_dataset`), and trained by
`tutor.preference_train.PreferenceTrainer`, whose reference is the model itself with its
adapter off (or a frozen copy of ``init_adapter``); the chunked loss does not apply there.

Not handled here: multi-dataset sampling by temperature (weights only repeat or
subsample), generation-based scoring (`tutor.eval`), and on-policy RL objectives (PPO, GRPO).
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.attention import SDPA_VARLEN, register
from tutor.checkpoints import newest_resumable
from tutor.chunked_loss import output_head
from tutor.common import CONFIG_FILE, apply_umask
from tutor.data import encode_dataset, load_conversations, with_system
from tutor.errors import TutorError, warn
from tutor.measure import optimizer_held_bytes
from tutor.models import load, load_tokenizer, lora_base_dtype, resolve, resolve_precision  # noqa: F401 (tutor.train API)
from tutor.packing import SHARE_BACKENDS, PackCollator, PackedDataset
from tutor.recipe_data import check_max_length, split_datasets, weighted
from tutor.runs import check_writable, claim_output_dir
from tutor.train_config import (
    TrainConfig,
    deepspeed_json,
    load_config,
    save_config,
)

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback

log = logging.getLogger("tutor.train")


def resolve_attention(choice: str) -> str:
    """"auto" → flash_attention_2 on a GPU where flash-attn imports, else tutor's sdpa_varlen.

    sdpa_varlen (`tutor.attention`) gives packed samples the same isolation as SDPA with a
    block mask but computes only each sample's own causal block (sum of n_i^2 scores per head
    instead of L^2), with the same loss and gradients (tests/test_attention.py).
    """
    import importlib.util

    import torch

    if choice == "auto":
        flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
        choice = "flash_attention_2" if flash else SDPA_VARLEN
    if choice == SDPA_VARLEN:
        register()  # transformers knows the name only once it is registered
    return choice


def build_model(cfg: TrainConfig, precision: str | None = None) -> tuple[Any, Any]:
    """Load the base (quantised if `cfg.bits`), pick attention, wrap in LoRA unless full FT.

    The frozen base of a LoRA run is loaded in bf16 when training in bf16 (no fp32 master
    copy is needed for weights that never change); adapters stay fp32 (peft's default),
    which autocast mixes in. A full fine-tune keeps fp32 master weights.
    """
    precision = precision or resolve_precision(cfg.train.precision)
    dtype = lora_base_dtype(precision) if cfg.lora is not None else "float32"
    model, tokenizer = load(cfg.model, bits=cfg.bits, dtype=dtype)
    attn = resolve_attention(cfg.attn_implementation)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    log.info("attention: %s, precision: %s, base dtype: %s", attn, precision, dtype)
    if cfg.lora is None:
        if cfg.bits is not None:
            raise TutorError("bits: a quantised base cannot be fully fine-tuned; add a lora "
                             "section (QLoRA) or set bits: null")
        model.train()
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.bits is not None:
        # Input grads on, checkpointing only if asked (peft's fp32 upcast undone below).
        t = cfg.train
        with warnings.catch_warnings():  # peft calls a renamed transformers property
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=t.gradient_checkpointing
                and not t.offload_activations)
        if t.gradient_checkpointing and t.offload_activations:  # peft cannot pass `offload`
            model.activation_checkpointing_enable(offload=True)
        if dtype != "float32":  # the frozen base back to 16 bits: 2 B/param less (1.4 GiB on 7B)
            import torch

            _frozen_to(model, getattr(torch, dtype))
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    if cfg.init_adapter:  # continue an adapter; DPO keeps a frozen copy as its reference
        from tutor.preference_train import load_policy_adapter

        model = load_policy_adapter(model, cfg.init_adapter, reference=cfg.method == "dpo")
    else:
        check_target_modules(cfg, model)  # one line instead of peft's traceback
        model = get_peft_model(model, lora)
    if cfg.lora.dropout > 0 and model.device.type == "cpu":
        from tutor.lora import use_lora_dropout

        use_lora_dropout(model)  # same keep rate and scaling, a cheaper mask on CPU
    model.train()
    return model, tokenizer


def check_target_modules(cfg: TrainConfig, model: Any = None) -> None:
    """Each of lora.target_modules must name a module of the model (peft's rule: the full
    name or a dotted suffix of it); else one line listing its Linear layers' names.

    Without `model` the check runs on a skeleton built from the config on the meta device
    (no weight loaded); a config transformers cannot build that way is checked after
    loading instead. A string target ("all-linear" or a regex) is left to peft.
    """
    import torch

    targets = cfg.lora.target_modules if cfg.lora is not None else "all-linear"
    if isinstance(targets, str) or (model is None and (model := _skeleton(cfg.model)) is None):
        return
    modules = dict(model.named_modules())
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in modules)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                         if isinstance(m, torch.nn.Linear)})
        raise TutorError(f"lora.target_modules: no module of {cfg.model} is named "
                         f"{', '.join(missing)}; its Linear layers are {', '.join(linear)} "
                         "(or use all-linear)")


def _skeleton(model_name: str) -> Any:
    """`model_name` built from its config on the meta device (no memory, no weights), or
    None when transformers cannot build it from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolve(model_name))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError):
        return None


def _frozen_to(model: Any, dtype: torch.dtype) -> None:
    """Every frozen fp32 tensor of the base (all but the 4/8-bit weights) back to `dtype`.

    peft's prepare_model_for_kbit_training casts every 16-bit parameter to fp32. Nothing of
    the base trains, so fp32 buys no precision (the values were 16-bit); it costs 2 bytes per
    parameter of the two vocab-sized matrices (InternLM2-7B: +1.4 GiB) and, under autocast, a
    16-bit copy of lm_head every step. torchtune's QLoRA keeps them in 16 bits too.
    """
    import torch

    for param in model.parameters():
        if param.dtype == torch.float32 and not param.requires_grad:
            param.data = param.data.to(dtype)


def load_samples(
    cfg: TrainConfig, tokenizer: Any, split: str = "train"
) -> tuple[list[dict[str, list[int]]], list]:
    """Encode every dataset of the recipe's `split` (`split_datasets`); weights repeat (2.0)
    or subsample (0.5) it. No validation configured: ``([], [])``.
    Returns the samples (``input_ids``/``labels`` lists) and one EncodeReport per file.
    """
    from datasets import Dataset

    check_max_length(cfg, tokenizer)
    rng = random.Random(cfg.train.seed)
    samples, reports = [], []
    parts = split_datasets(cfg, split, load_conversations)
    for _, weight, conversations in parts:
        if cfg.system is not None:  # the recipe's system prompt first in every conversation
            conversations = Dataset.from_dict(
                {"messages": [with_system(m, cfg.system) for m in conversations["messages"]]})
        encoded, report = encode_dataset(
            conversations, tokenizer, cfg.template, cfg.data.max_length
        )
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in encoded]
        samples += weighted(rows, weight, rng)
        reports.append(report)
    if parts and not samples:
        val = isinstance(cfg.data.validation, str) and split == "validation"
        key = "data.validation" if val else "data.datasets"
        raise TutorError(f"{key}: no sample with a trainable token was left")
    return samples, reports


def single_sample_packs(samples: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """`packing: none`: each sample its own row (padded per batch by the collator)."""
    return [{**s, "position_ids": list(range(len(s["input_ids"])))} for s in samples]


def build_dataset(cfg: TrainConfig, tokenizer: Any, attn_implementation: str = "sdpa",
                  mask_dtype: torch.dtype | None = None, split: str = "train"):
    """(dataset of packs, collator, encode reports) for `cfg`'s train or validation split.

    Both splits are packed the same way and share the collator (`tutor.packing.PackCollator`
    with ``keep_logits=True``: logits only where the loss needs them), so the validation
    loss is computed exactly like the training loss. `mask_dtype` is the model's (for eager's
    additive mask). The validation dataset is None when the recipe has no ``data.validation``.
    """
    samples, reports = load_samples(cfg, tokenizer, split)
    if not samples:
        dataset: Any = None
    elif cfg.data.packing == "none":
        dataset = single_sample_packs(samples)
    else:
        dataset = PackedDataset(  # fixed validation packs: every evaluation sees the same
            samples, cfg.data.max_length, cfg.data.packing, seed=cfg.train.seed,
            reshuffle=split == "train",
            share_prefix=cfg.data.share_prefix and attn_implementation in SHARE_BACKENDS,
        )
    collator = PackCollator(attn_implementation, tokenizer.pad_token_id, mask_dtype,
                            keep_logits=True)
    return dataset, collator, reports


def check_device_options(cfg: TrainConfig) -> None:
    """Refuse, in one line, the options that need a CUDA GPU when there is none (before the
    model loads): activation offload and bitsandbytes' 8-bit / paged optimizers."""
    t, cuda = cfg.train, _has_cuda()
    if t.offload_activations and not t.gradient_checkpointing:
        raise TutorError("train.offload_activations: offloads what gradient checkpointing "
                         "keeps; set train.gradient_checkpointing=true too")
    if t.offload_activations and not cuda:
        raise TutorError("train.offload_activations: moves checkpointed activations off a CUDA "
                         "GPU; without one they already live in CPU memory (set it to false)")
    if t.optim is not None:
        from transformers.training_args import OptimizerNames

        known = [o.value for o in OptimizerNames]
        if t.optim not in known:
            raise TutorError(f"train.optim: unknown optimizer '{t.optim}' (e.g. adamw_torch, "
                             "adamw_8bit, paged_adamw_8bit; transformers' OptimizerNames)")
        if ("8bit" in t.optim or "paged" in t.optim) and not cuda:
            raise TutorError(f"train.optim: {t.optim} (bitsandbytes) needs a CUDA GPU; on CPU "
                             "use adamw_torch or leave train.optim unset")


def resolve_chunked_loss(cfg: TrainConfig, model: Any = None, zero3: bool = False,
                         ) -> int | None:
    """Rows per chunk of `tutor.chunked_loss`, or None for the model's own loss.

    true: chunked (a model whose head it cannot handle is a TutorError, before training).
    "auto": chunked whenever `model`'s head allows it (a bias-free Linear, no soft-capping)
    and DeepSpeed ZeRO-3 (`zero3`) does not partition it, else the model's own loss.

    Why on by default: the loss is the same (tests/test_chunked_loss.py), the matmuls are the
    same (two in LoRA, lm_head being frozen; three in full fine-tuning), and it measured lower
    in memory and no slower. bench/chunked_loss.py (bundled 135M, LoRA r=8, 4 packs of 512
    tokens per step, fp32, 2-core AVX2 AMD EPYC shared with other jobs, so speeds are noisy):
    peak live tensors of a step 3,482 MiB unchunked vs 3,140 / 3,060 MiB in chunks of 1,024 /
    256 rows; peak RSS 6,223 vs 5,756 / 5,678 MiB; 5.4 vs 7.6 / 8.4 trained tok/s; the same
    loss (3.9244 after 6 steps). Hence chunks of 256 rows by default.
    On 7B-class vocabularies the logits are the largest activation (tutor.memory).
    """
    choice = cfg.train.chunked_loss
    if choice is False:
        return None
    try:
        if zero3:
            raise TutorError("chunked loss: DeepSpeed ZeRO-3 partitions lm_head's weight, "
                             "which the chunked loss reads directly; set "
                             "train.chunked_loss=false")
        if model is not None:
            output_head(model)
    except TutorError:
        if choice == "auto":
            return None
        raise
    return cfg.train.loss_chunk_size


def training_arguments(cfg: TrainConfig, precision: str, deepspeed: str | None = None,
                       validate: bool = False):
    """Map the recipe onto `transformers.TrainingArguments` (the one place that does).

    `validate`: there is a validation set; evaluate it before training and every
    ``train.eval_steps`` (`tutor.trainer.EvaluateAtEnd` adds the last step).
    """
    import torch
    from transformers import TrainingArguments

    t, cpu = cfg.train, not torch.cuda.is_available()
    ds = deepspeed or cfg.deepspeed
    return TrainingArguments(
        output_dir=cfg.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=t.gradient_checkpointing and cfg.bits is None,
        activation_checkpointing_kwargs=({"offload": True} if t.offload_activations
                                         and cfg.bits is None else None),
        **({"optim": t.optim} if t.optim else {}),  # else Trainer's default
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if validate and t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        eval_on_start=validate,
        per_device_eval_batch_size=t.batch_size,
        prediction_loss_only=True,  # the loss is all we need: no logits kept or gathered
        label_names=["labels"],
        remove_unused_columns=cfg.method == "sft",  # pair packs carry pair_ids to the loss
        disable_tqdm=not t.progress_bar,
        save_strategy="steps" if cfg.save.steps > 0 else "no",
        save_steps=max(cfg.save.steps, 1),
        save_total_limit=cfg.save.total_limit,
        report_to=[],
        use_cpu=cpu,
        dataloader_pin_memory=not cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=deepspeed_json(ds) if ds else None,
    )


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    answers: dict[str, dict[int, str]] = field(default_factory=dict)  # prompt → step → answer
    reports: list = field(default_factory=list)  # EncodeReport per dataset
    start_step: int = 0  # the checkpoint's step when resumed: this run did the steps after it
    scores: dict[str, list] = field(default_factory=dict)  # "before"/"after" → FileScores


def last_checkpoint(output_dir: str | Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def resume_point(output_dir: str | Path) -> tuple[str, int]:
    """(newest finished checkpoint of `output_dir`, its step); says which on rank 0, and
    which newer, damaged ones it skipped (`tutor.checkpoints.newest_resumable`)."""
    checkpoint, step, skipped = newest_resumable(output_dir)
    if os.environ.get("RANK", "0") == "0":
        for reason in skipped:
            warn(f"skipping {reason}")
        print(f"resuming from {checkpoint.name}", flush=True)
    return str(checkpoint), step


def train(
    cfg: TrainConfig | str,
    overrides: Sequence[str] = (),
    resume: bool = False,
    deepspeed: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune as the recipe says; save the adapter (or model) and config in output_dir.

    output_dir belongs to this run (`tutor.runs.claim_output_dir`): it must be missing or
    empty, unless `resume=True`, which continues from the newest finished ``checkpoint-N``
    in it (optimizer, scheduler, RNG and data position restored; damaged newer ones
    skipped), or `overwrite=True`, which deletes the old run's files first. It is locked
    while the run lasts.
    `deepspeed` overrides the recipe's (``zero2``, ...); CPU runs need
    ``DS_ACCELERATOR=cpu``, which is set here.
    """
    if isinstance(cfg, str):
        cfg = load_config(cfg, list(overrides))
    check_writable(cfg.output_dir)  # before anything loads
    if (deepspeed or cfg.deepspeed) and not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    if not (deepspeed or cfg.deepspeed):  # transformers imports it to probe; it then warns
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from transformers import set_seed

    set_seed(cfg.train.seed)

    check_max_length(cfg, load_tokenizer(cfg.model))  # before the model loads and logs
    check_device_options(cfg)
    if cfg.method != "sft":
        from tutor.preference_train import check_recipe

        check_recipe(cfg)
    elif not cfg.init_adapter:
        check_target_modules(cfg)  # from the config alone, before the weights load
    with claim_output_dir(cfg.output_dir, resume, overwrite):
        return _train(cfg, resume, deepspeed, callbacks)


def _train(cfg: TrainConfig, resume: bool, deepspeed: str | None,
           callbacks: Sequence[TrainerCallback]) -> TrainResult:
    """`train` once output_dir is claimed: model, data, Trainer, saved results."""
    # These import transformers' Trainer (and with it peft and bitsandbytes): only here.
    from tutor.callbacks import EvaluateChatCallback, MetricsCallback, ThroughputCallback
    from tutor.trainer import EvaluateAtEnd

    resume_from, start_step = resume_point(cfg.output_dir) if resume else (None, 0)
    precision = resolve_precision(cfg.train.precision)
    model, tokenizer = build_model(cfg, precision)
    attn = model.config._attn_implementation
    build = build_dataset
    if cfg.method != "sft":
        from tutor.preference_train import build_pair_dataset as build
    dataset, collator, reports = build(cfg, tokenizer, attn, model.dtype)
    for spec, report in zip(cfg.data.datasets, reports, strict=True):
        log.info("%s: %s", spec.path, report)
    validation, eval_collator, val_reports = build(cfg, tokenizer, attn, model.dtype,
                                                   split="validation")
    val = cfg.data.validation  # a fraction: one report per dataset; a file: one report
    val_paths = [s.path for s in cfg.data.datasets] if isinstance(val, float) else [val]
    for path, report in zip(val_paths[:len(val_reports)], val_reports, strict=True):
        log.info("validation from %s: %s", path, report)
    args = training_arguments(cfg, precision, deepspeed, validate=validation is not None)
    throughput = ThroughputCallback(collator, model, resume_from)
    chat = EvaluateChatCallback(cfg, tokenizer)
    trainer = make_trainer(
        cfg,
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=validation,
        data_collator=collator,
        eval_collator=eval_collator,
        callbacks=[chat, throughput, MetricsCallback(cfg),
                   *([EvaluateAtEnd()] if validation is not None else []), *callbacks],
    )
    if trainer.is_world_process_zero():
        save_config(cfg, Path(cfg.output_dir) / CONFIG_FILE)
    output = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(cfg.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(cfg.output_dir)
        apply_umask(cfg.output_dir)  # safetensors leaves the adapter at 600
    held = {"optimizer_bytes": optimizer_held_bytes(trainer.optimizer, model)}  # this rank's
    return TrainResult(
        Path(cfg.output_dir), trainer.state.global_step,
        {**output.metrics, **throughput.summary(), **held}, trainer.state.log_history,
        chat.answers, reports, start_step, scores=chat.scores,
    )


def make_trainer(cfg: TrainConfig, **kwargs: Any) -> Any:
    """The Trainer for `cfg.method`: `tutor.trainer.ValidationTrainer` (SFT, with the
    chunked loss where it applies) or `tutor.preference_train.PreferenceTrainer` (dpo, orpo)."""
    if cfg.method == "sft":
        from tutor.trainer import ValidationTrainer

        zero3 = _zero_stage(kwargs["args"]) == 3
        return ValidationTrainer(loss_chunk=resolve_chunked_loss(cfg, kwargs["model"], zero3),
                                 **kwargs)
    from tutor.preference_train import PreferenceTrainer

    p = cfg.preference
    return PreferenceTrainer(method=cfg.method, beta=p.beta, loss_type=p.loss_type,
                             orpo_lambda=p.orpo_lambda, **kwargs)


def _zero_stage(args: Any) -> int:
    """DeepSpeed ZeRO stage of the TrainingArguments (0 without DeepSpeed)."""
    import json

    ds = args.deepspeed
    if not ds:
        return 0
    config = ds if isinstance(ds, dict) else json.loads(Path(ds).read_text())
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
