"""Training recipes: YAML files validated into a `TrainConfig` dataclass.

A recipe is plain data (no executed Python, unlike XTuner's configs): YAML is read,
`--set key=value` overrides are applied to the raw mapping, and the result is checked
field by field against the dataclasses below. Every mistake names its key path::

    lora.r: expected int, got str ('eight')
    train.lrr: unknown key (known: epochs, max_steps, batch_size, ...)

Ready recipes ship in `tutor/configs/` (`list_recipes()`, `copy_recipe()`).

Not handled here: building the model or running training (`tutor.train`), checking
that files named in the recipe exist (done when the data is loaded), or YAML anchors
across files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tutor.chunked_loss import DEFAULT_CHUNK
from tutor.common import atomic_write
from tutor.errors import TutorError

RECIPES_DIR = Path(__file__).parent / "configs"
DEEPSPEED_DIR = RECIPES_DIR / "deepspeed"
DATA_DIR = RECIPES_DIR / "data"  # the data the shipped recipes train on (installed with tutor)
# The recipe the demo trains, and the course's Pico assistant (notebooks 06-08) with it.
ASSISTANT_RECIPE = "smollm2_135m_qlora_assistant"


@dataclass
class LoraSection:
    """Low-rank adapters: W' = W + (alpha / r) · B A, only A and B are trained."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # 0 lets peft skip the dropout op entirely (faster on CPU)
    target_modules: str | list[str] = "all-linear"  # peft's name for every Linear but lm_head


@dataclass
class DatasetSpec:
    """One data file; `weight` repeats it (2.0 = twice, 0.5 = a random half) when mixing."""

    path: str
    format: str = "auto"  # passed to tutor.data.load_conversations
    weight: float = 1.0


@dataclass
class DataSection:
    datasets: list[DatasetSpec] = field(default_factory=list)
    max_length: int = 512  # tokens per sample and per pack
    packing: Literal["bfd", "greedy", "none"] = "bfd"
    # Store a prefix that most samples begin with (e.g. the template's default system turn)
    # once per pack (tutor.packing): same loss, fewer tokens. Where the attention can see a
    # shared prefix (sdpa_varlen, sdpa, eager); flash-attention packs without it.
    share_prefix: bool = False
    # Validation: a data file (format auto), or a fraction (0 < f < 1) of each dataset's
    # conversations held out with train.seed before weighting and packing; null = none.
    validation: str | float | None = None


@dataclass
class OptimSection:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1  # packs (or padded samples) per device per micro-step
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"  # any transformers SchedulerType name
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False  # trades ~30 % speed for activation memory
    # with checkpointing: each block's saved input in pinned CPU memory (GPU only)
    offload_activations: bool = False
    # loss over the vocabulary in chunks of rows (tutor.chunked_loss): no [tokens, vocab]
    # logits; "auto" = on where it helps (tutor.train.resolve_chunked_loss)
    chunked_loss: bool | Literal["auto"] = "auto"
    loss_chunk_size: int = DEFAULT_CHUNK  # rows per chunk
    # a transformers optimizer name (adamw_torch, paged_adamw_8bit, adamw_8bit, ...);
    # null = Trainer's default. 8-bit and paged ones need a CUDA GPU (bitsandbytes).
    optim: str | None = None
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int = 0  # validation loss every N optimizer steps (0 = before and after only)
    progress_bar: bool = True  # tqdm bar; notebooks turn it off and read the printed logs


@dataclass
class SaveSection:
    steps: int = 50  # checkpoint every N optimizer steps (0 = only at the end)
    total_limit: int | None = 2  # keep the newest N checkpoints


@dataclass
class EvaluationSection:
    """Prompts answered before, every N steps and after training (XTuner's EvaluateChatHook);
    `files` scored by `tutor.eval` (keyword hits, answer loss) before and after training."""

    prompts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    system: str | None = None  # for the prompts; null = the recipe's top-level `system`
    every_n_steps: int = 0  # 0 = only before and after
    max_new_tokens: int = 48


@dataclass
class PreferenceSection:
    """DPO / ORPO on preference pairs (``method: dpo | orpo``; tutor.preference)."""

    beta: float = 0.1  # DPO: how far the policy may move from the reference (larger = less)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's loss, as TRL defines them
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term beside the chosen NLL


@dataclass
class TrainConfig:
    model: str  # bundled name, local directory or hub id (tutor.models.load)
    output_dir: str
    template: str = "auto"  # tutor.templates name; "auto" = the tokenizer's own
    # System prompt put first in every conversation without one (training, validation,
    # evaluation prompts and files), recorded for chat and export; null = the template's
    # own default system prompt (SmolLM2's: "You are a helpful AI assistant named SmolLM...")
    system: str | None = None
    bits: int | None = None  # 4 = QLoRA (NF4), 8 = int8, None = full precision base
    lora: LoraSection | None = field(default_factory=LoraSection)  # null = full fine-tune
    data: DataSection = field(default_factory=DataSection)
    train: OptimSection = field(default_factory=OptimSection)
    save: SaveSection = field(default_factory=SaveSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    # sft: conversations; dpo / orpo: preference pairs (tutor.data.load_pairs) in data.datasets
    method: Literal["sft", "dpo", "orpo"] = "sft"
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    # An adapter to start from (an adapter dir, a run's output_dir or one of its checkpoints),
    # trained further as the policy; under dpo it is also the frozen reference.
    init_adapter: str | None = None
    attn_implementation: Literal["auto", "sdpa_varlen", "sdpa", "eager",
                                 "flash_attention_2"] = "auto"
    deepspeed: str | None = None  # zero1|zero2|zero3|zero2_offload|zero3_offload or a JSON path


# What each number must satisfy, checked as it is read (so before anything is written):
# key -> (test, what the message says it must be). Defaults satisfy them all.
Range = tuple[Callable[[Any], bool], str]
POSITIVE: Range = (lambda v: v > 0 and math.isfinite(v), "> 0")
AT_LEAST_1: Range = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE: Range = (lambda v: v >= 0, ">= 0")
RANGES: dict[type, dict[str, Range]] = {
    LoraSection: {"r": AT_LEAST_1, "alpha": POSITIVE,
                  "dropout": (lambda v: 0 <= v < 1, ">= 0 and < 1")},
    DatasetSpec: {"weight": POSITIVE},
    DataSection: {"max_length": (lambda v: v >= 2, ">= 2 (an input and a target; the "
                                 "template needs more, checked with the tokenizer)")},
    OptimSection: {"epochs": POSITIVE, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1,
                   "lr": POSITIVE, "max_steps": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
                   "warmup_ratio": (lambda v: 0 <= v < 1, ">= 0 and < 1"),
                   "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
                   "logging_steps": AT_LEAST_1, "loss_chunk_size": AT_LEAST_1},
    SaveSection: {"steps": NON_NEGATIVE, "total_limit": AT_LEAST_1},
    EvaluationSection: {"every_n_steps": NON_NEGATIVE, "max_new_tokens": AT_LEAST_1},
    PreferenceSection: {"beta": POSITIVE, "orpo_lambda": NON_NEGATIVE},
    TrainConfig: {"bits": (lambda v: v in (4, 8), "4, 8 or null")},
}


class RecipeError(TutorError):
    """A bad recipe value; `key` is its path (``lora.r``), so callers can say where it
    came from (the file or a ``--set``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


# ---------------------------------------------------------------- YAML reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-4` as a float (YAML 1.1 wants `2.0e-4`, users write `2e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error names `source` and its line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise TutorError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc


# ---------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp` and build dataclasses; raise with the key path."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, path)
            except TutorError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(path, f"expected one of {_type_name(tp)}, got {value!r}")
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    got = "mapping" if isinstance(value, dict) else _type_name(type(value))
    raise RecipeError(path, f"expected {_type_name(tp)}, got {got} ({value!r})")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise RecipeError(path, f"unknown key{_did_you_mean(str(key), fields, prefix)} "
                              f"(known: {', '.join(fields)})")
        kwargs[key] = _convert(value, hints[key], path)
        test, must = RANGES.get(cls, {}).get(key, (None, ""))
        if test is not None and kwargs[key] is not None and not test(kwargs[key]):
            raise RecipeError(path, f"must be {must}, got {value!r}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"{where}{missing[0]}", "required key is missing")
    return cls(**kwargs)


# Names other trainers use for tutor's keys (transformers' TrainingArguments, peft's
# LoraConfig): a recipe carried over from them gets the tutor name suggested.
KEY_ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs",
               "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler",
               "lora_alpha": "alpha", "lora_dropout": "dropout", "save_steps": "steps",
               "save_total_limit": "total_limit", "model_name_or_path": "model"}


def _did_you_mean(key: str, fields: Iterable[str], prefix: str) -> str:
    """" ; did you mean train.lr?" for a mistyped or foreign key name, else ""."""
    import difflib

    fields = list(fields)
    names = fields + [a for a, name in KEY_ALIASES.items() if name in fields]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    if not close:
        return ""
    where = f"{prefix}." if prefix else ""
    return f"; did you mean {where}{KEY_ALIASES.get(close[0], close[0])}?"


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` to the raw mapping (value parsed as YAML), in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise TutorError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # e.g. `lora: null` in the file and `--set lora.r=4`
        node = node[part]
    node[leaf] = parse_yaml(text, f"--set {key}")


def load_config(name_or_path: str | os.PathLike[str], overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe (a name from `list_recipes()` or a YAML path), apply overrides, validate."""
    path = resolve_recipe(name_or_path)
    raw = parse_yaml(path.read_text(encoding="utf-8-sig"), str(path))
    if not isinstance(raw, dict):
        raise TutorError(f"{path}: a recipe must be a YAML mapping of keys to values")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return _build(TrainConfig, raw)
    except RecipeError as exc:
        raise TutorError(f"{_source(exc.key, path, overrides)}: {exc}") from None


def _source(key: str, path: Path, overrides: list[str]) -> str:
    """Where the bad `key` came from: the last ``--set`` that wrote it (or a parent of
    it), else the recipe file."""
    for assignment in reversed(overrides):
        target = assignment.partition("=")[0]
        if key == target or key.startswith((f"{target}.", f"{target}[")):
            return f"--set {assignment}"
    return str(path)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Validate an in-memory mapping (notebooks, tests) exactly like a YAML file."""
    return _build(TrainConfig, raw)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config atomically (temp file in the same dir, then rename)."""
    return atomic_write(path, to_yaml(cfg))


# ---------------------------------------------------------------- recipes


def list_recipes() -> list[str]:
    """Names of the recipes shipped in tutor/configs/ (without .yaml), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{Path(name_or_path).name.removesuffix('.yaml')}.yaml"
    if str(name_or_path) and shipped.is_file() and os.sep not in str(name_or_path):
        return shipped
    raise TutorError(
        f"no recipe file or name '{name_or_path}'; `tutor list-cfg` shows the shipped recipes"
    )


def copy_recipe(name: str, dest: str | os.PathLike[str]) -> Path:
    """Copy a shipped recipe to `dest` (a file path or an existing directory) to edit it."""
    src = resolve_recipe(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise TutorError(f"{target} exists; choose another destination or delete it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


def resolve_data_path(path: str | os.PathLike[str], key: str = "data.datasets") -> str:
    """A recipe's dataset path: as written (relative to the working directory), else relative
    to the shipped recipes (``data/assistant.jsonl`` → tutor/configs/data/assistant.jsonl), so
    the shipped recipes and copies of them run from any directory, also from an installed wheel.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return str(p)
    if (RECIPES_DIR / p).exists():
        return str(RECIPES_DIR / p)
    raise TutorError(f"{key}: no file '{path}' (relative to {Path.cwd()} or to the "
                     f"shipped recipes in {RECIPES_DIR})")


def deepspeed_json(name_or_path: str) -> str:
    """Path of a DeepSpeed JSON: a shipped name (zero2, zero3_offload, ...) or a file."""
    shipped = DEEPSPEED_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return str(shipped)
    if Path(name_or_path).is_file():
        return str(Path(name_or_path))
    known = ", ".join(sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")))
    raise TutorError(f"deepspeed: no config '{name_or_path}' (shipped: {known}, or a JSON path)")
