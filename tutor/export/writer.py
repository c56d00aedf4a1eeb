"""Merged model → one GGUF file that llama.cpp, Ollama and LM Studio run (`tutor export`).

Written with the `gguf` package (gguf-py) alone; llama.cpp is not needed to export.
What decides whether llama.cpp produces sense from the file:

- tensor names in llama.cpp's scheme (``model.layers.3.self_attn.q_proj.weight`` →
  ``blk.3.attn_q.weight``), from gguf-py's `TensorNameMap`;
- Q and K rows put back in llama.cpp's rotary order. HF checkpoints of Llama rotate the
  two *halves* of each head (``rotate_half``); llama.cpp rotates *adjacent pairs*, so the
  rows of each head are interleaved ``[0, d/2, 1, d/2+1, ...]`` (`unpermute_rows`);
- norms and every 1-D tensor kept F32; a matrix whose rows are not a multiple of the
  quant block (32 for Q8_0/Q4_0) falls back to F16, and the summary says so;
- the tokenizer: model "gpt2" (byte-level BPE), every token with its type, the merges,
  the pre-tokenizer name, bos/eos/unk/pad ids, the end-of-turn id (``<|im_end|>`` for
  ChatML) and the Jinja chat template;
- tied embeddings: no ``output.weight``; llama.cpp then uses ``token_embd`` as the head.

Types: f16, bf16, q8_0 (8-bit blocks of 32), q4_0 (4-bit blocks of 32). In q4_0 the
token embedding (also the output head when tied), ``output.weight``, ``attn_v`` and
``ffn_down`` are Q8_0: llama.cpp's own quantizers give the head (Q6_K) and these two
(Q4_K_M) more bits too, with K-quants gguf-py cannot write. q4_0 is lossy on a 135M
model: see the measured agreement in `tutor.export.check`.

Not handled: architectures other than Llama (`LlamaForCausalLM`; SmolLM, Llama 2/3 style
checkpoints with a BPE tokenizer.json), SentencePiece tokenizers, rope scaling other than
none/linear, K-quants, sharded output. Verification is `tutor.export.check`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tutor.common import atomic_file
from tutor.errors import TutorError
from tutor.export.check import check_export
from tutor.export.modelfile import write_modelfile
from tutor.export.vocab import add_vocab
from tutor.merge import merge
from tutor.models import load, resolve
from tutor.runs import GGUF_SYSTEM_KEY, pick_template, recorded_system
from tutor.templates import get_template

if TYPE_CHECKING:
    import numpy as np

SUPPORTED_ARCHS = ("LlamaForCausalLM",)
TYPES = ("f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # elements per Q8_0 / Q4_0 block
# Kept Q8_0 in q4_0 files, as llama.cpp's Q4_K_M gives these more bits: on the bundled model
# next-token agreement rose from 0.616 to 0.768 for +14 MiB (bench/export_check.py).
MORE_BITS = ("attn_v.weight", "ffn_down.weight")
# Pre-tokenizers recognised from a tokenizer.json's structure (llama.cpp names).
PRE_BYTELEVEL = "gpt-2"
PRE_DIGITS_BYTELEVEL = "smollm"


@dataclass
class ExportReport:
    """What `export_gguf` wrote: path, size, tensor types and any fallbacks."""

    out: str
    type: str
    bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type → tensor count
    fallbacks: list[str] = field(default_factory=list)  # tensors kept F16 (rows ≠ k*block)
    pre_tokenizer: str = ""
    modelfile: str | None = None
    check: Any = None  # a tutor.export.check.CheckReport when verified

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        lines = [f"wrote {self.out} ({self.type}): {self.bytes / 2**20:.1f} MiB; "
                 f"tensors: {types}; pre-tokenizer {self.pre_tokenizer}"]
        if self.fallbacks:
            lines.append(f"kept F16 (rows not a multiple of {BLOCK}): "
                         + ", ".join(self.fallbacks))
        if self.modelfile:
            lines.append(f"wrote {self.modelfile} (ollama create NAME -f {self.modelfile})")
        if self.check is not None:
            lines.append(self.check.summary())
        return "\n".join(lines)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotary row order → llama.cpp's, per head: rows (h, 2, d/2) become (h, d/2, 2).

    `w`: (n_heads * head_dim, ...) — a q_proj/k_proj weight (or bias). HF's conversion
    from Meta's layout put the first/second element of each rotary pair into the first/
    second half of the head; this interleaves them back. transformers' GGUF reader
    applies the inverse when it loads the file.
    """
    head = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def check_supported(config: Any) -> None:
    """Refuse, in one line, a model this exporter does not write correctly.

    `config`: a transformers config or the dict of a config.json.
    """
    cfg = config if isinstance(config, dict) else config.to_dict()
    archs = list(cfg.get("architectures") or [])
    if not archs and cfg.get("model_type") == "llama":
        archs = ["LlamaForCausalLM"]
    if not archs or archs[0] not in SUPPORTED_ARCHS:
        raise TutorError(f"cannot export architecture {archs[0] if archs else 'unknown'}: "
                         f"supported: {', '.join(SUPPORTED_ARCHS)} (Llama-style models)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", "default") or "default"
    if kind not in ("default", "linear"):
        raise TutorError(f"cannot export rope type '{kind}': supported: default, linear")


def ggml_type(name: str, shape: tuple[int, ...], kind: str, tied: bool) -> tuple[Any, bool]:
    """(GGMLQuantizationType, fell_back) for GGUF tensor `name` of `shape` at `kind`.

    F32 for 1-D tensors and norms; for q8_0/q4_0 a row length that is not a multiple of
    the block falls back to F16 (fell_back=True).
    """
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or name.endswith("norm.weight"):
        return T.F32, False
    if kind in ("f16", "bf16"):
        return (T.F16 if kind == "f16" else T.BF16), False
    want = T.Q8_0
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    if kind == "q4_0" and not (head or name.endswith(MORE_BITS)):
        want = T.Q4_0
    if shape[-1] % BLOCK:
        return T.F16, True
    return want, False


def file_type(kind: str) -> int:
    from gguf import LlamaFileType as F

    return {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[kind]


def add_hparams(writer: Any, config: Any, kind: str) -> None:
    """Architecture keys llama.cpp reads for a Llama model."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(file_type(kind))


def add_tensors(writer: Any, model: Any, kind: str, report: ExportReport) -> None:
    """Every weight of `model`, renamed, rotary-unpermuted and quantised as `ggml_type` says."""
    import gguf
    import numpy as np

    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the same matrix as the embedding; llama.cpp reuses token_embd
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TutorError(f"cannot map tensor '{hf_name}' to a llama.cpp name: this "
                             f"checkpoint is not a plain Llama ({', '.join(SUPPORTED_ARCHS)})")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = unpermute_rows(data, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = unpermute_rows(data, kv_heads)
        qtype, fell_back = ggml_type(name, data.shape, kind, tied)
        if fell_back:
            report.fallbacks.append(name)
        packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(name, packed, raw_dtype=qtype)  # shape from the packed bytes
        report.tensor_types[qtype.name] = report.tensor_types.get(qtype.name, 0) + 1


def export_model(model: Any, tokenizer: Any, model_dir: Path, out: Path, kind: str,
                 template_stop_words: tuple[str, ...] = (),
                 system: str | None = None) -> ExportReport:
    """Write `model` (a loaded Llama, fp32) + its tokenizer to GGUF file `out`, atomically.

    `model_dir` is where tokenizer.json / tokenizer_config.json live (read for merges and
    special tokens). `template_stop_words`: the chat template's end-of-turn strings; the
    first that is one token becomes ``tokenizer.ggml.eot_token_id``. `system`: the recipe's
    system prompt, written as ``tutor.system`` (`tutor chat FILE.gguf` uses it by default).
    """
    import gguf


    if kind not in TYPES:
        raise TutorError(f"--type must be one of {', '.join(TYPES)}, not '{kind}'")
    check_supported(model.config)
    out = Path(out)
    if out.suffix != ".gguf":
        raise TutorError(f"{out}: the output file name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ExportReport(str(out), kind, 0)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(model_dir).name)
        add_hparams(writer, model.config, kind)
        report.pre_tokenizer = add_vocab(writer, tokenizer, Path(model_dir), model.config,
                                         template_stop_words)
        if system is not None:
            writer.add_string(GGUF_SYSTEM_KEY, system)
        add_tensors(writer, model, kind, report)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report.bytes = out.stat().st_size
    return report


def export_gguf(
    model: str,
    out: str | Path,
    kind: str = "q8_0",
    adapter: str | None = None,
    ollama: bool = False,
    verify: bool = True,
    template: str | None = None,
) -> ExportReport:
    """`tutor export`: load MODEL (merging `adapter` first), write OUT, check it, Modelfile.

    MODEL: a merged/base directory or the bundled name. With `adapter`, the adapter is
    merged into MODEL in a temporary directory first (`tutor.merge.merge`, verified).
    `verify` reloads the file with transformers and compares logits (`tutor.export.check`);
    a file outside the tolerance is deleted and `TutorError` raised. `ollama` writes a
    `Modelfile` beside OUT. `template`: the chat template (default: recorded, else auto).
    The system prompt recorded at training (`tutor.runs.recorded_system`) goes into the
    file's metadata and the Modelfile's SYSTEM line (else the template's default does).
    """
    out = Path(out)
    if kind not in TYPES:
        raise TutorError(f"--type must be one of {', '.join(TYPES)}, not '{kind}'")
    _refuse_adapter_as_model(model)
    with tempfile.TemporaryDirectory(prefix=".tutor-export-", dir=out.parent if
                                     out.parent.exists() else None) as work:
        if adapter is not None:
            merged = Path(work) / "merged"
            template = pick_template(model, adapter, template)
            merge(model, adapter, merged)  # records the adapter's system prompt
            model = str(merged)
        return _export_loaded(model, out, kind, ollama, verify,
                              pick_template(model, None, template),
                              recorded_system(model, None))


def _refuse_adapter_as_model(model: str) -> None:
    """MODEL must be a full model; a LoRA adapter dir is told to go through --adapter."""
    folder = Path(model)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return
    base = json.loads((folder / "adapter_config.json").read_text()).get(
        "base_model_name_or_path") or "BASE"
    raise TutorError(f"{folder} is a LoRA adapter, not a full model; pass its base model "
                     f"and the adapter: tutor export {base} OUT.gguf --adapter {folder}")


def _export_loaded(model: str, out: Path, kind: str, ollama: bool, verify: bool,
                   template_name: str, system: str | None) -> ExportReport:
    model_dir = Path(resolve(model))
    config = json.loads((model_dir / "config.json").read_text())
    check_supported(config)  # refuse before loading any weights
    lm, tokenizer = load(str(model_dir))
    template = get_template(template_name, tokenizer=tokenizer)
    report = export_model(lm, tokenizer, model_dir, out, kind, template.stop_words, system)
    if verify:
        try:
            report.check = check_export(lm, tokenizer, out, kind, template)
        except TutorError:
            out.unlink(missing_ok=True)
            raise
    if ollama:
        report.modelfile = str(write_modelfile(out, template, system))
    return report
