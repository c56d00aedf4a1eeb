"""From training checkpoint to adapter to merged model (`tutor convert`, `tutor merge`).

A Trainer checkpoint ``OUTPUT/checkpoint-N/`` holds the LoRA adapter (peft's
``adapter_config.json`` + ``adapter_model.safetensors``) next to optimizer and
scheduler state that only resuming needs. `convert_checkpoint` copies the adapter
alone into a standalone directory and records, in ``tutor_adapter.json``, which base
model and chat template it was trained with (from ``tutor_config.yaml``).

Merging folds each LoRA update into its weight, ``W' = W + (alpha / r) * B @ A``, so
the model runs with no adapter code at all. The base is always loaded in full
precision, also for adapters trained with QLoRA: folding a bf16 update into NF4 codes
would round it away. After saving, the merged copy is loaded back and its logits are
compared with base+adapter on a probe batch; only a copy that passes is moved to OUT.

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

from tutor.common import CONFIG_FILE, atomic_dir
from tutor.errors import TutorError, warn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_META = "tutor_adapter.json"  # written by convert: base model + template
MERGED_META = "tutor_model.json"  # written by merge: provenance + the logits check
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


def _read_json(path: Path) -> dict[str, Any]:
    try:  # utf-8-sig: a file saved by an editor that writes a BOM reads the same
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TutorError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def train_config(checkpoint: Path) -> dict[str, Any]:
    """The `tutor_config.yaml` of a checkpoint (or of its parent run directory), or {}."""
    import yaml

    for folder in (checkpoint, checkpoint.parent):
        path = folder / CONFIG_FILE
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise TutorError(f"{path}: not valid YAML ({exc})") from exc
            if not isinstance(data, dict):
                raise TutorError(f"{path}: expected a mapping of config keys")
            return data
    return {}


def check_adapter_dir(path: Path) -> dict[str, Any]:
    """Raise `TutorError` unless `path` holds a complete peft adapter whose config matches
    its weights; return its adapter_config."""
    from tutor.checkpoints import check_safetensors

    path = Path(path)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise TutorError(
            f"{path} is not a LoRA adapter/checkpoint directory: missing {', '.join(missing)}"
            + (" (pickled adapter_model.bin is not read: re-save with safetensors)"
               if (path / "adapter_model.bin").exists() else "")
        )
    config = _read_json(path / "adapter_config.json")
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
    cfg = train_config(checkpoint)
    meta = {
        "base_model": base_model or cfg.get("model")
        or adapter_config.get("base_model_name_or_path"),
        "template": template or cfg.get("template"),
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
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def recorded(path: str | Path, key: str) -> Any:
    """`key` from the tutor metadata of an adapter or merged directory, else None."""
    for name in (ADAPTER_META, MERGED_META):
        meta = Path(path) / name
        if meta.is_file():
            return _read_json(meta).get(key)
    return None


def _other_base(adapter_dir: Path, base_name: str) -> str | None:
    """The base recorded for the adapter (tutor's metadata, else peft's) when it is not
    `base_name`, else None."""
    from tutor.models import resolve

    wanted = recorded(adapter_dir, "base_model") or _read_json(
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

    def summary(self) -> str:
        return (f"merged into {self.out} ({self.dtype}); logits check: max |merged - "
                f"(base+adapter)| = {self.max_abs_diff:.2e} <= {self.tolerance:g}; "
                f"adapter {self.adapter_bytes / 2**20:.2f} MiB -> merged "
                f"{self.merged_bytes / 2**20:.2f} MiB on disk")


def merge(
    base: str,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
) -> MergeReport:
    """Fold `adapter` into `base`, save to `out` (safetensors + tokenizer), verify logits.

    Raises `TutorError` for a mismatched base/adapter or when the saved merged model's
    logits differ from base+adapter by more than `TOLERANCE[dtype]`; OUT is then untouched.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tutor.models import load
    from tutor.quiet import no_progress_bars

    adapter = Path(adapter)
    check_adapter_dir(adapter)
    if dtype not in TOLERANCE:
        raise TutorError(f"--dtype must be one of {', '.join(TOLERANCE)}, not '{dtype}'")
    model, tokenizer = load(base, dtype=dtype)  # never quantised: see module docstring
    check_compatible(model, adapter, base)
    with warnings.catch_warnings():  # peft calls a deprecated transformers method
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    expected = probe_logits(peft_model, tokenizer)  # base + adapter, computed unmerged
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
            raise TutorError(f"merged logits differ from base+adapter by {diff:.3g} > "
                             f"{TOLERANCE[dtype]} ({dtype}); OUT was not written")
        report = MergeReport(str(out), dtype, diff, TOLERANCE[dtype], adapter_bytes(adapter),
                             0, template)
        meta = {k: v for k, v in asdict(report).items() if k != "merged_bytes"}
        meta.update(base_model=base, adapter=str(adapter.resolve()))
        (tmp / MERGED_META).write_text(json.dumps(meta, indent=2) + "\n")
        report.merged_bytes = dir_bytes(tmp)
    return report
