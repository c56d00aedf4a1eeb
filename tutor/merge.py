"""From training checkpoint to adapter to merged model (`tutor convert`, `tutor merge`).

A Trainer checkpoint ``OUTPUT/checkpoint-N/`` holds the LoRA adapter (peft's
``adapter_config.json`` + ``adapter_model.safetensors``) next to optimizer and
scheduler state that only resuming needs. `convert_checkpoint` copies the adapter
alone into a standalone directory and records, in ``tutor_adapter.json``, which base
model and chat template it was trained with (from ``tutor_config.yaml``).

Merging folds each LoRA update into its weight, ``W' = W + (alpha / r) * B @ A``, so
the model runs with no adapter code at all. The merged weights are saved in full (or 16-bit)
precision, never re-quantised here. Which W: by default the base's own full-precision
weights. A QLoRA adapter was trained against NF4(W), not W; ``base_from_nf4=True`` (``tutor
merge --base-from-nf4``) merges into the NF4 base dequantised exactly as training saw it
(bitsandbytes, tutor's one 4-bit config: NF4, blocksize 64, double-quantised absmax, in the
dtype the run loaded its base in), so the merged model is the trained model (notebook 07
measures both). After saving, the merged copy is loaded back and its logits are compared on
a probe batch with what it must equal: base+adapter, computed unmerged in the same dtype (with
``base_from_nf4``: the dequantised NF4 base + adapter, which is the trained model's weights; the
distance to bitsandbytes' own NF4 forward, which computes in bf16 where native, is reported
beside it); only a copy that passes is moved to OUT.

Not handled: adapters other than LoRA-family ones peft can merge (prompt tuning has
no weight to merge into), several adapters at once, sharded or pickled (.bin) adapters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.checkpoints import check_safetensors
from tutor.common import atomic_dir
from tutor.errors import TutorError, warn
from tutor.models import load, lora_base_dtype, resolve, resolve_precision
from tutor.offline import no_progress_bars
from tutor.runs import ADAPTER_META, MERGED_META, read_json, recorded, recorded_config, write_record

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Max |logit difference| allowed between merged and base+adapter, by dtype. fp32 sums
# round differently (W+BA vs. W x + B(A x)): ~1e-5 on logits of size ~10. In 16 bits
# the merged weight itself is rounded to 8 (bf16) or 11 (fp16) mantissa bits.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}
PROBE_TEXTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Low-rank adapters add a small update to each weight matrix.",
)


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def adapter_bytes(path: Path) -> int:
    """Size of the adapter itself (`ADAPTER_FILES`), not of whatever else is in its folder
    (a checkpoint holds optimizer state, an output dir nested checkpoints)."""
    return sum((Path(path) / name).stat().st_size for name in ADAPTER_FILES)


def check_adapter_dir(path: Path) -> dict[str, Any]:
    """Raise `TutorError` unless `path` holds a complete peft adapter whose config matches
    its weights; return its adapter_config."""
    path = Path(path)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise TutorError(
            f"{path} is not a LoRA adapter/checkpoint directory: missing {', '.join(missing)}"
            + (" (pickled adapter_model.bin is not read: re-save with safetensors)"
               if (path / "adapter_model.bin").exists() else "")
        )
    config = read_json(path / "adapter_config.json")
    header = check_safetensors(path / "adapter_model.safetensors")
    _check_rank(path, config, {k: v["shape"] for k, v in header.items()})
    return config


def _check_rank(path: Path, config: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    """The rank in adapter_config.json (`r`, or its `rank_pattern` entry, matched as peft
    matches it) must be the rank of each LoRA weight: A is (r, in), B is (out, r)."""
    pattern = config.get("rank_pattern") or {}
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_")[0]
        expect = next((r for p, r in pattern.items() if re.match(rf"(.*\.)?({p})$", module)),
                      config.get("r"))
        got = shape[0] if ".lora_A." in key else shape[1]
        if got != expect:
            raise TutorError(f"{path}: adapter_config.json says r={expect} but '{key}' has "
                             f"rank {got} (shape {list(shape)}): the config does not belong "
                             "to these weights; restore the adapter_config.json saved with them")


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    base_model: str | None = None,
    template: str | None = None,
    force: bool = False,
) -> Path:
    """Copy the adapter of a Trainer checkpoint into a standalone directory `out`.

    `base_model`/`template` override what `tutor_config.yaml` says (keys `model`,
    `template`); without either, peft's recorded base path is kept and template is None.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise TutorError(f"no checkpoint directory at {checkpoint}")
    adapter_config = check_adapter_dir(checkpoint)
    cfg = recorded_config(checkpoint)
    meta = {
        "base_model": base_model or cfg.get("model")
        or adapter_config.get("base_model_name_or_path"),
        "template": template or cfg.get("template"),
        "system": cfg.get("system"),  # the recipe's system prompt (None: the template's)
        "bits": cfg.get("bits"),  # 4: trained against an NF4 base (merge --base-from-nf4)
        "precision": (cfg.get("train") or {}).get("precision"),
        "source_checkpoint": str(checkpoint.resolve()),
        "peft_type": adapter_config.get("peft_type"),
        "r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
    }
    if not meta["base_model"]:
        raise TutorError(f"{checkpoint}: no base model recorded; pass --base-model")
    adapter_config["base_model_name_or_path"] = meta["base_model"]
    with atomic_dir(Path(out), force) as tmp:
        shutil.copy2(checkpoint / "adapter_model.safetensors", tmp)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        write_record(tmp, ADAPTER_META, meta)
    return Path(out)


def _other_base(adapter_dir: Path, base_name: str) -> str | None:
    """The base recorded for the adapter (tutor's metadata, else peft's) when it is not
    `base_name`, else None."""
    wanted = recorded(adapter_dir, "base_model") or read_json(
        adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if not wanted or wanted == base_name or Path(str(wanted)).name == Path(base_name).name:
        return None
    try:
        return None if resolve(wanted) == resolve(base_name) else str(wanted)
    except TutorError:
        return str(wanted)


def check_compatible(base: PreTrainedModel, adapter_dir: Path, base_name: str) -> None:
    """Refuse an adapter whose tensor shapes do not fit `base`; warn (one line) when the
    shapes fit but the adapter records another base model."""
    from safetensors import safe_open

    wanted = _other_base(adapter_dir, base_name)
    trained_on = f"; it was trained on base '{wanted}', not '{base_name}'" if wanted else ""
    modules = dict(base.named_modules())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(name)
            shape = tuple(f.get_slice(key).get_shape())
            if module is None or not hasattr(module, "in_features"):
                raise TutorError(f"{adapter_dir}: adapter targets '{name}', which the base "
                                 f"'{base_name}' has no linear layer for{trained_on}")
            expect = module.in_features if ".lora_A." in key else module.out_features
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != expect:
                raise TutorError(
                    f"{adapter_dir}: '{key}' has shape {list(shape)} but base "
                    f"'{base_name}' layer '{name}' needs {expect} there: wrong base "
                    f"model{trained_on}"
                )
    if wanted:
        warn(f"{adapter_dir} was trained on base '{wanted}', not '{base_name}'; the shapes "
             "fit, so it is used anyway (the result is meaningful only on its own base)")


def probe_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Any:
    """fp32 logits (B, T, V) of `PROBE_TEXTS` (right-padded, pad positions zeroed)."""
    import torch

    batch = tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        logits = model(**batch).logits.float()
    return logits * batch["attention_mask"][..., None]


@dataclass
class MergeReport:
    """What `merge` did: where, the logits check and the sizes on disk."""

    out: str
    dtype: str
    max_abs_diff: float
    tolerance: float
    adapter_bytes: int
    merged_bytes: int
    template: str | None
    reference: str = "base+adapter"  # what the merged logits were checked against
    # --base-from-nf4: max |merged - NF4 base+adapter as bitsandbytes computes it| (its
    # compute dtype: bf16 where native, so this is mostly bf16 vs. fp32 arithmetic)
    runtime_diff: float | None = None

    def summary(self) -> str:
        runtime = ("" if self.runtime_diff is None else
                   f" (vs. NF4 base+adapter in bitsandbytes: {self.runtime_diff:.3g})")
        return (f"merged into {self.out} ({self.dtype}); logits check: max |merged - "
                f"({self.reference})| = {self.max_abs_diff:.2e} <= {self.tolerance:g}{runtime}; "
                f"adapter {self.adapter_bytes / 2**20:.2f} MiB -> merged "
                f"{self.merged_bytes / 2**20:.2f} MiB on disk")


def merge(
    base: str,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    base_from_nf4: bool = False,
) -> MergeReport:
    """Fold `adapter` into `base`, save to `out` (safetensors + tokenizer), verify logits.

    `base_from_nf4`: fold it into the dequantised NF4 base instead (module docstring), check
    against that base + adapter, and report the distance to NF4 base + adapter as
    bitsandbytes runs it (`MergeReport.runtime_diff`). Raises `TutorError` for a mismatched
    base/adapter or when the saved merged model's logits differ from the reference by more
    than `TOLERANCE[dtype]`; OUT is then untouched.
    """
    import torch
    from transformers import AutoModelForCausalLM

    adapter = Path(adapter)
    check_adapter_dir(adapter)
    if dtype not in TOLERANCE:
        raise TutorError(f"--dtype must be one of {', '.join(TOLERANCE)}, not '{dtype}'")
    model, tokenizer = load(base, dtype=dtype)
    check_compatible(model, adapter, base)
    reference, runtime = "base+adapter", None
    if base_from_nf4:
        runtime = _load_nf4_base_into(model, base, adapter)
        reference = "dequantised NF4 base+adapter"
    peft_model = _with_adapter(model, adapter)
    expected = probe_logits(peft_model, tokenizer)  # (that) base + adapter, computed unmerged
    merged = peft_model.merge_and_unload()
    template = recorded(adapter, "template")
    # Saving imports DeepSpeed (through accelerate), which guesses the accelerator and logs
    # the guess; we already know it.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with atomic_dir(Path(out), force) as tmp, no_progress_bars():
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # includes the chat template (chat_template.jinja)
        del merged, peft_model, model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype))
        diff = float((probe_logits(reloaded, tokenizer) - expected).abs().max())
        if not diff <= TOLERANCE[dtype]:
            raise TutorError(f"merged logits differ from {reference} by {diff:.3g} > "
                             f"{TOLERANCE[dtype]} ({dtype}); OUT was not written")
        report = MergeReport(str(out), dtype, diff, TOLERANCE[dtype], adapter_bytes(adapter),
                             0, template, reference)
        if runtime is not None:  # vs. the trained model as bitsandbytes runs it
            report.runtime_diff = float((probe_logits(reloaded, tokenizer) - runtime)
                                        .abs().max())
        meta = {k: v for k, v in asdict(report).items() if k != "merged_bytes"}
        meta.update(base_model=base, adapter=str(adapter.resolve()),
                    system=recorded(adapter, "system"), base_from_nf4=base_from_nf4)
        write_record(tmp, MERGED_META, meta)
        report.merged_bytes = dir_bytes(tmp)
    return report


def _with_adapter(model: PreTrainedModel, adapter: Path) -> Any:
    from peft import PeftModel

    with warnings.catch_warnings():  # peft calls a deprecated transformers method
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter))


def _load_nf4_base_into(model: PreTrainedModel, base: str, adapter: Path) -> Any:
    """Overwrite `model`'s weights (in place, in its dtype) with the base as a QLoRA run saw
    it; return the probe logits of NF4 base + adapter as bitsandbytes computes them.

    The run's base is loaded again with `tutor.models.load(bits=4)` in the dtype training
    loaded it in (`tutor.models.lora_base_dtype` of the precision recorded in the adapter's
    metadata; "auto" resolves on this machine). Each 4-bit weight is dequantised with its own
    bitsandbytes quant state; every other weight (embeddings, norms) is taken in that dtype.
    """
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Params4bit

    bits = recorded(adapter, "bits")
    if bits not in (None, 4):
        raise TutorError(f"{adapter}: trained with bits={bits}, not on an NF4 base: "
                         "--base-from-nf4 applies to QLoRA (bits: 4) adapters only")
    precision = resolve_precision(recorded(adapter, "precision") or "auto")
    nf4, tokenizer = load(base, bits=4, dtype=lora_base_dtype(precision))
    trained = dict(nf4.named_parameters())  # names as in `model` (tied weights listed once)
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = trained[name]
            if isinstance(source, Params4bit):
                source = dequantize_4bit(source.data, source.quant_state)
            param.copy_(source.to(param.dtype))
    return probe_logits(_with_adapter(nf4, adapter), tokenizer)
