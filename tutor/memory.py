"""How much memory does fine-tuning need? An estimator for full / LoRA / QLoRA training.

The estimate is arithmetic on a Hugging Face config (a local directory, the bundled model, or a
built-in table of real configs so it works offline), for the path tutor.train takes::

    weights      every parameter in `dtype`; QLoRA: block linears in NF4 (tutor.quant), the rest
                 (embeddings, lm_head, norms, biases) in `dtype` (peft's
                 prepare_model_for_kbit_training upcasts them to fp32; tutor.train casts them
                 back, as nothing of the base trains); + the rotary buffers
    LoRA         r * (in + out) per adapted linear, fp32 (peft upcasts adapters to fp32)
    gradients    one per trainable number, in its dtype
    optimizer    AdamW: exp_avg + exp_avg_sq in fp32 (+ an fp32 master copy of 16-bit weights
                 in full fine-tuning); paged_adamw_8bit: 1 byte each + fp32 absmax per 256
    activations  what autograd keeps per token and block (see `layer_activation_bytes`) for
                 every block; with gradient checkpointing only each block's input; with
                 checkpointing + offload not even that (it waits in CPU memory, not counted)
                 + the final norm's fp32 input and lm_head's input
    recompute    gradient checkpointing: the one block whose activations are rebuilt in
                 backward (+ its input, copied back from the CPU, when offloaded)
    logits       unchunked: tokens * vocab * 12 bytes: the fp32 log-softmax kept for backward
                 and the two fp32 gradients alive while backward crosses it (the logits
                 themselves and their fp32 copy are freed by then, and are smaller).
                 Chunked (tutor.chunked_loss): one chunk's rows * vocab * 8 (its fp32 logits
                 and logsumexp's fp32 temporary; later the logits, softmax'ed in place, and
                 their 16-bit gradient, which is no more) + the
                 gradient of the hidden states, tokens * hidden * dtype, computed in forward;
                 full fine-tuning adds the fp32 gradient of lm_head (vocab * hidden * 4).

    peak = weights + LoRA + optimizer + activations + max(logits, recompute + gradients)

The logits peak comes at the end of forward / the very start of backward, before any gradient
exists (trainers free gradients after each step); later, gradients grow while blocks are
recomputed and freed. Without checkpointing we count all activations in both phases: an upper
bound. Tokens are all `seq_len * batch` positions: with tutor's collator only positions with a
trained next token reach the loss, so the logits row is an upper bound too.

`tutor.measure.measure_step` checks the arithmetic on a real model: exact tensor bytes for
the persistent parts, and the peak of live tensor bytes over one training step
(tests/test_memory.py). Offload cannot be measured on a CPU (the activations stay in the same
memory); its row is the bytes transformers' offload moves (tests count them on CPU).

Not handled: eager attention (its (heads, L, L) scores; we assume SDPA / flash attention, which
keep none), mixture-of-experts, vision towers, KV caches, ZeRO sharding (tutor.course.zero), the
CUDA context (its size depends on the GPU, driver and CUDA version), pinned host memory, and
allocator fragmentation. Only Llama-style blocks (q/k/v/o + gated MLP): Llama, Mistral, Qwen2,
InternLM2, SmolLM2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tutor.chunked_loss import DEFAULT_CHUNK
from tutor.errors import TutorError
from tutor.models import BUNDLED, ensure_bundled
from tutor.quant import nf4_storage_bytes

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")


@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only Llama-style model that memory depends on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    fused_qkv: bool = False  # InternLM2: one wqkv linear instead of q/k/v

    def block_linears(self) -> list[tuple[int, int, bool]]:
        """(in, out, has_bias) of the linear layers of ONE block, in forward order."""
        h, q, kv, inter = (self.hidden_size, self.num_heads * self.head_dim,
                           self.num_kv_heads * self.head_dim, self.intermediate_size)
        b = self.qkv_bias
        attn = [(h, q + 2 * kv, b)] if self.fused_qkv else [(h, q, b), (h, kv, b), (h, kv, b)]
        return [*attn, (q, h, False), (h, inter, False), (h, inter, False), (inter, h, False)]

    def linear_weights(self) -> int:
        """Numbers in the weight matrices of all blocks (what QLoRA quantises)."""
        return self.num_layers * sum(i * o for i, o, _ in self.block_linears())

    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied), RMSNorm weights and biases: kept in 16/32 bits."""
        heads = 1 if self.tie_embeddings else 2
        biases = self.num_layers * sum(o for _, o, b in self.block_linears() if b)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return heads * self.vocab_size * self.hidden_size + biases + norms

    def num_params(self) -> int:
        return self.linear_weights() + self.other_params()


# Real configs (config.json of the hub checkpoints), so `tutor memory` works offline.
KNOWN: dict[str, Arch] = {a.name: a for a in [
    Arch("internlm2-chat-7b", 92544, 4096, 14336, 32, 32, 8, 128, fused_qkv=True),
    Arch("qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4, 128, qkv_bias=True),
    Arch("llama-3-8b", 128256, 4096, 14336, 32, 32, 8, 128),
    Arch("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, 128),
    Arch("mistral-7b", 32000, 4096, 14336, 32, 32, 8, 128),
    Arch("qwen2.5-1.5b", 151936, 1536, 8960, 28, 12, 2, 128, tie_embeddings=True, qkv_bias=True),
    Arch("qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, 64, tie_embeddings=True, qkv_bias=True),
]}


def arch_from_config(config: dict, name: str) -> Arch:
    """Read an `Arch` from a config.json dict; a missing key is a TutorError naming it."""
    try:
        heads = config["num_attention_heads"]
        return Arch(
            name=name, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
            fused_qkv=config.get("model_type") == "internlm2",
        )
    except KeyError as exc:
        raise TutorError(f"config of '{name}' has no key {exc}: not a Llama-style decoder") from exc


def get_arch(model: str) -> Arch:
    """An `Arch` from a built-in name, a local model directory or a bundled model name."""
    if model in KNOWN:
        return KNOWN[model]
    path = ensure_bundled(model) if model in BUNDLED else Path(model).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise TutorError(f"'{model}' is not a built-in config ({', '.join(KNOWN)}), a bundled "
                         "model, or a directory with config.json")
    return arch_from_config(json.loads(config.read_text()), name=model)


@dataclass(frozen=True)
class Setup:
    """One training configuration. `dtype` is that of unquantised weights and activations."""

    method: str = "qlora"
    seq_len: int = 2048
    batch: int = 1
    grad_checkpointing: bool = True
    optimizer: str = "adamw"
    lora_r: int = 64
    lora_dropout: float = 0.0
    dtype: str = "bfloat16"
    chunked_loss: bool = False  # tutor.chunked_loss, `loss_chunk` rows at a time
    loss_chunk: int = DEFAULT_CHUNK
    offload: bool = False  # checkpointed block inputs in CPU memory (needs grad_checkpointing)

    def __post_init__(self) -> None:
        for key, value, allowed in [("method", self.method, METHODS),
                                    ("optimizer", self.optimizer, OPTIMIZERS),
                                    ("dtype", self.dtype, tuple(DTYPE_BYTES))]:
            if value not in allowed:
                raise TutorError(f"{key} must be one of {', '.join(allowed)}, not '{value}'")
        if min(self.seq_len, self.batch, self.lora_r, self.loss_chunk) < 1:
            raise TutorError("seq_len, batch, lora_r and loss_chunk must be positive")
        if self.offload and not self.grad_checkpointing:
            raise TutorError("offload needs gradient checkpointing (it offloads what "
                             "checkpointing keeps)")


# The training settings of the shipped GPU QLoRA recipes (tutor/configs/*7b*qlora*.yaml,
# llama3_8b_instruct_qlora.yaml; tests/test_memory.py checks they agree): `tutor memory`'s
# defaults.
GPU_RECIPE = Setup(method="qlora", seq_len=2048, batch=1, grad_checkpointing=True,
                   optimizer="paged_adamw_8bit", lora_r=64, lora_dropout=0.1, dtype="bfloat16",
                   chunked_loss=True, loss_chunk=256, offload=False)


def weight_bytes(arch: Arch, setup: Setup) -> int:
    """Bytes of the model's own tensors: parameters, rotary buffers, NF4 quantisation state."""
    dt = DTYPE_BYTES[setup.dtype]
    rope = 2 * (arch.head_dim // 2) * 4  # inv_freq and original_inv_freq, fp32
    if setup.method != "qlora":
        return arch.num_params() * dt + rope
    nf4 = arch.num_layers * sum(nf4_storage_bytes(i * o) for i, o, _ in arch.block_linears())
    return nf4 + arch.other_params() * dt + rope


def trainable(arch: Arch, setup: Setup) -> list[int]:
    """Sizes of the trainable tensors: LoRA's A and B per linear, or every parameter."""
    if setup.method != "full":
        r = setup.lora_r
        return [n for i, o, _ in arch.block_linears() for n in (r * i, o * r)] * arch.num_layers
    block = [n for i, o, b in arch.block_linears() for n in ([i * o, o] if b else [i * o])]
    block += [arch.hidden_size] * 2  # the two RMSNorm weights
    embeddings = [arch.vocab_size * arch.hidden_size] * (1 if arch.tie_embeddings else 2)
    return block * arch.num_layers + embeddings + [arch.hidden_size]  # + the final norm


def optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    """Optimizer state for trainable tensors of `sizes` numbers.

    adamw (torch): exp_avg and exp_avg_sq in fp32 + a 4-byte step tensor per parameter.
    paged_adamw_8bit (bitsandbytes): two uint8 states + two fp32 absmax per 256 numbers for
    tensors of 4096 numbers or more, two fp32 states for smaller ones, and the two shared
    256-entry fp32 quantisation maps. "Paged" only says where it lives (CUDA unified memory,
    evicted to CPU RAM under pressure): the bytes are the same.
    """
    if optimizer == "adamw":
        return sum(8 * n + 4 for n in sizes)
    return 2 * 256 * 4 + sum(2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes)


def layer_activation_bytes(arch: Arch, setup: Setup) -> int:
    """Bytes autograd keeps for backward per token in ONE block (measured pattern, SDPA).

    Per token: RMSNorm keeps its fp32 input (2 norms x h x 4); the block keeps the normed input
    of attention and MLP, q after RoPE and the attention output (4 x h), k and v (2 x kv), the
    MLP's gate, SiLU(gate), up and their product (4 x I), all in `dtype`; SDPA's log-sum-exp
    (heads x 4) and two rsqrt values. Full fine-tuning also keeps each norm's normalised fp32
    input (for the norm weight's gradient). LoRA adds A's output (r) per linear, and a private
    copy of the linear's input when it differs from the shared one (dropout, or fp32 adapters on
    16-bit activations).
    """
    a = DTYPE_BYTES[setup.dtype]
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    total = 2 * h * 4 + (2 * h + 2 * q + 2 * kv + 4 * inter) * a + arch.num_heads * 4 + 2 * 4
    if setup.method == "full":
        return total + 2 * h * 4
    inputs = sum(i for i, _, _ in arch.block_linears())
    total += len(arch.block_linears()) * setup.lora_r * 4  # A's output, fp32
    if setup.lora_dropout > 0 or a != 4:
        total += inputs * 4  # each adapter's own fp32 (dropped-out) copy of its input
    if setup.lora_dropout > 0:
        total += inputs  # dropout masks, 1 byte each
    return total


@dataclass(frozen=True)
class Estimate:
    arch: Arch
    setup: Setup
    rows: dict[str, int]  # component -> bytes

    @property
    def total(self) -> int:
        r = self.rows
        return (r["weights"] + r["LoRA adapters"] + r["optimizer state"] + r["activations"]
                + max(r["logits"], r["recompute"] + r["gradients"]))

    def fits(self, gib: float) -> bool:
        return self.total <= gib * GIB


def estimate(arch: Arch, setup: Setup) -> Estimate:
    """Estimate training memory of `arch` under `setup`, component by component (bytes)."""
    tokens = setup.seq_len * setup.batch
    dt = DTYPE_BYTES[setup.dtype]
    sizes = trainable(arch, setup)
    numel = sum(sizes)
    lora = 0 if setup.method == "full" else numel * 4
    grads = numel * (dt if setup.method == "full" else 4)
    opt = optimizer_bytes(sizes, setup.optimizer)
    if setup.method == "full" and dt != 4:
        opt += numel * 4  # mixed precision keeps an fp32 master copy of every weight
    per_layer = layer_activation_bytes(arch, setup)
    if setup.offload:  # block inputs wait in CPU memory; one comes back to be rebuilt
        kept, recompute = 0, per_layer + arch.hidden_size * dt
    elif setup.grad_checkpointing:  # each block keeps only its input; one is rebuilt at a time
        kept, recompute = arch.num_layers * arch.hidden_size * dt, per_layer
    else:
        kept, recompute = arch.num_layers * per_layer, 0
    head = arch.hidden_size * (4 + dt)  # final norm's fp32 input, lm_head's input
    rows = {
        "weights": weight_bytes(arch, setup),
        "LoRA adapters": lora,
        "gradients": grads,
        "optimizer state": opt,
        "activations": tokens * (kept + head),
        "recompute": tokens * recompute,
        "logits": loss_bytes(arch, setup),
    }
    return Estimate(arch, setup, rows)


def loss_bytes(arch: Arch, setup: Setup) -> int:
    """Peak bytes of the loss over the vocabulary (the "logits" row; see the module doc)."""
    tokens = setup.seq_len * setup.batch
    if not setup.chunked_loss:
        return tokens * arch.vocab_size * 12
    dt = DTYPE_BYTES[setup.dtype]
    chunk = min(setup.loss_chunk, tokens) * arch.vocab_size * 8
    d_head = arch.vocab_size * arch.hidden_size * 4 if setup.method == "full" else 0
    return chunk + tokens * arch.hidden_size * dt + d_head


def format_table(est: Estimate, budget_gib: float = 8.0) -> str:
    """The estimate as a text table in GiB, with what each row is made of and the verdict."""
    a, s = est.arch, est.setup
    numel = sum(trainable(a, s))
    quant = "NF4 + double quant" if s.method == "qlora" else s.dtype
    head = (f"{a.name}: {a.num_params() / 1e9:.2f} B params · {s.method} ({quant}"
            + (f", LoRA r={s.lora_r} on {a.num_layers * len(a.block_linears())} linears"
               if s.method != "full" else "")
            + f") · seq {s.seq_len} x batch {s.batch} · "
            + ("gradient checkpointing" if s.grad_checkpointing else "no checkpointing")
            + (" + offload" if s.offload else "")
            + (f" · chunked loss ({s.loss_chunk} rows)" if s.chunked_loss else "")
            + f" · {s.optimizer}")
    notes = {
        "weights": (f"{a.linear_weights() / 1e9:.2f} B in NF4, {a.other_params() / 1e9:.2f} B "
                    f"in {s.dtype}" if s.method == "qlora" else f"{a.num_params() / 1e9:.2f} B "
                    f"in {s.dtype}"),
        "LoRA adapters": f"{numel / 1e6:.1f} M in fp32" if s.method != "full" else "-",
        "gradients": f"{numel / 1e6:,.1f} M trainable",
        "optimizer state": s.optimizer + (" + fp32 master" if s.method == "full" and s.dtype
                                          != "float32" else ""),
        "activations": ("offloaded to CPU memory" if s.offload else "each block's input"
                        if s.grad_checkpointing else "all blocks"),
        "recompute": "one block, rebuilt in backward" if s.grad_checkpointing else "-",
        "logits": (f"chunks of {min(s.loss_chunk, s.seq_len * s.batch)} of "
                   f"{s.seq_len * s.batch} tokens x {a.vocab_size} vocab" if s.chunked_loss
                   else f"{s.seq_len * s.batch} tokens x {a.vocab_size} vocab"),
    }
    lines = [head, f"{'component':<17}{'GiB':>8}  made of"]
    lines += [f"{k:<17}{v / GIB:>8.2f}  {notes[k]}" for k, v in est.rows.items()]
    verdict = "fits" if est.fits(budget_gib) else "does NOT fit"
    lines.append(f"{'peak total':<17}{est.total / GIB:>8.2f}  weights + LoRA + optimizer + "
                 "activations + max(logits, recompute + gradients)")
    lines.append(f"{verdict} in {budget_gib:g} GiB")
    return "\n".join(lines)

