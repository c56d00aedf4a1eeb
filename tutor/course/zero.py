"""DeepSpeed ZeRO: what each stage leaves on one GPU, built on tutor.memory's estimate.

Data parallelism runs the same model on N GPUs, each on its own micro-batch, and averages the
gradients. Plain DDP (stage 0) keeps everything on every GPU. ZeRO (Rajbhandari et al., 2020)
partitions what is redundant, 1/N per GPU, and fetches it when needed::

    stage 0   nothing (DDP)              every GPU: weights + gradients + optimizer state
    stage 1   optimizer state            fp32 master copy, Adam exp_avg and exp_avg_sq
    stage 2   + gradients                reduce-scattered instead of all-reduced
    stage 3   + parameters               each layer all-gathered just before it runs
    offload   optimizer state and fp32 gradients to CPU RAM (stage 3: parameters too)

Every stage, 0 included, counts DeepSpeed's mixed-precision layout, bytes per trainable number
(dt = training dtype)::

    working copy dt · gradient dt · fp32 gradient 4 (made for the step)
    · fp32 master 4 · Adam moments 8

Stage 0 partitions none of it, so with one GPU every stage holds the same model states, and a
higher stage never holds more of anything than a lower one. (`tutor.memory.estimate`, one GPU
with torch's AdamW and no DeepSpeed, counts no fp32 gradient copy and keeps LoRA adapters in
fp32: 4 bytes per trainable number less in full fine-tuning; its activations, recompute and
logits rows are what every stage uses here.)

For bf16 full fine-tuning that is DeepSpeed's own ``2 + 18 / N`` bytes per parameter under
ZeRO-2; tests/test_zero.py checks every offload variant against deepspeed's estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`). Under
stage 3 we also count each GPU's 16-bit parameter share (2/N), which DeepSpeed's no-offload
formula (18/N) leaves out although its offload formula counts it.

Activations, recompute and logits are per GPU and unchanged: each GPU runs its own micro-batch
(splitting those is sequence/tensor parallelism). A frozen LoRA base is partitioned only by
stage 3. Not handled: communication buckets (``reduce_bucket_size`` and friends, a few hundred
MB), ZeRO++ / MiCS, NVMe offload, pinned-memory overheads, the CUDA context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tutor.errors import TutorError
from tutor.memory import DTYPE_BYTES, GIB, Arch, Estimate, Setup, estimate, trainable
from tutor.train_config import deepspeed_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STATES = ("weights", "LoRA adapters", "gradients", "optimizer state")


@dataclass(frozen=True)
class Zero:
    """A data-parallel layout: ZeRO `stage` over `gpus` ranks in all (all nodes together)."""

    stage: int = 2
    gpus: int = 8
    offload_optimizer: bool = False
    offload_param: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise TutorError(f"ZeRO stage must be 0, 1, 2 or 3, not {self.stage}")
        if self.gpus < 1:
            raise TutorError(f"gpus must be at least 1, not {self.gpus}")
        if self.offload_optimizer and self.stage == 0:
            raise TutorError("offload_optimizer needs ZeRO stage 1, 2 or 3")
        if self.offload_param and self.stage != 3:
            raise TutorError("offload_param needs ZeRO stage 3 (only it partitions parameters)")

    @property
    def label(self) -> str:
        name = "DDP (ZeRO-0)" if self.stage == 0 else f"ZeRO-{self.stage}"
        off = [w for w, on in (("opt", self.offload_optimizer), ("params", self.offload_param))
               if on]
        return name + (f" + offload {'+'.join(off)}" if off else "")

    @classmethod
    def from_deepspeed(cls, name_or_path: str, gpus: int) -> Zero:
        """The layout a DeepSpeed JSON asks for (a shipped name such as ``zero3_offload``)."""
        path = deepspeed_json(name_or_path)
        try:
            zero = json.loads(Path(path).read_text())["zero_optimization"]
        except (ValueError, KeyError) as exc:
            raise TutorError(f"{path}: no readable zero_optimization section ({exc})") from exc
        off = {k: (zero.get(k) or {}).get("device", "none") not in ("none", None)
               for k in ("offload_optimizer", "offload_param")}
        return cls(stage=int(zero.get("stage", 0)), gpus=gpus, **off)


def largest_layer(arch: Arch) -> int:
    """Numbers in the biggest single module: what ZeRO-3 gathers at once.

    DeepSpeed's ``largest_layer_params`` is the same count: parameters of one module
    (not recursing), the embedding or lm_head (vocab x hidden) or the largest linear.
    """
    linear = max(i * o + (o if b else 0) for i, o, b in arch.block_linears())
    return max(arch.vocab_size * arch.hidden_size, linear)


@dataclass(frozen=True)
class ZeroEstimate:
    base: Estimate  # one GPU, no DeepSpeed (tutor.memory)
    zero: Zero
    gpu: dict[str, int]  # per GPU: STATES + "gathered layer" + activations, recompute, logits
    cpu: dict[str, int]  # per GPU process, in host RAM: what offload moved there

    @property
    def model_states(self) -> int:
        """Weights, adapters, gradients, optimizer state and the gathered layer, per GPU."""
        return sum(self.gpu[k] for k in (*STATES, "gathered layer"))

    @property
    def total(self) -> int:
        """Peak per GPU, in the phases of `tutor.memory.Estimate.total`."""
        g = self.gpu
        return (self.model_states - g["gradients"] + g["activations"]
                + max(g["logits"], g["recompute"] + g["gradients"]))

    def fits(self, gib: float) -> bool:
        return self.total <= gib * GIB


def estimate_zero(arch: Arch, setup: Setup, zero: Zero) -> ZeroEstimate:
    """Per-GPU (and offloaded CPU) memory of training `arch` under `setup` with `zero`."""
    base = estimate(arch, setup)
    if setup.optimizer != "adamw":
        raise TutorError(f"optimizer {setup.optimizer}: under DeepSpeed (ZeRO stages 0-3) it "
                         "keeps its own fp32 Adam state; estimate with optimizer=adamw")
    if setup.method == "qlora" and zero.stage == 3:
        raise TutorError("ZeRO-3 cannot partition a 4-bit base unless it is stored with "
                         "bnb_4bit_quant_storage=bfloat16, which tutor.models does not set; "
                         "use ZeRO-2 for QLoRA")
    # Stage 0 keeps whole copies: the layout of stages 1-3 with partitions of one.
    n, dt = (zero.gpus if zero.stage else 1), DTYPE_BYTES[setup.dtype]
    numel = sum(trainable(arch, setup))
    part = -(-numel // n)  # DeepSpeed pads flat partitions to equal sizes
    adapters = numel * dt if setup.method != "full" else 0  # DeepSpeed casts them to dt
    grads16 = numel if zero.stage <= 1 else part  # stages 0 and 1 keep whole gradients
    gpu = {**base.rows, "LoRA adapters": adapters, "gradients": grads16 * dt + 4 * part,
           "optimizer state": 12 * part, "gathered layer": 0}
    cpu = dict.fromkeys(STATES, 0)
    if zero.stage == 3:
        gpu["weights"] = -(-base.rows["weights"] // n)  # the frozen base is partitioned too
        gpu["LoRA adapters"] = part * dt if adapters else 0
        gpu["gathered layer"] = 2 * dt * largest_layer(arch)  # its 16-bit weights and grads
    if zero.offload_optimizer:
        # fp32 gradients are copied to host buffers as buckets are reduced (stage 2/3)
        cpu["gradients"], cpu["optimizer state"] = 4 * part, gpu["optimizer state"]
        gpu["gradients"] = numel * dt if zero.stage == 1 else 0
        gpu["optimizer state"] = 0
    if zero.offload_param:
        for key in ("weights", "LoRA adapters"):
            cpu[key], gpu[key] = gpu[key], 0
    return ZeroEstimate(base, zero, gpu, cpu)


def format_zero_table(estimates: Sequence[ZeroEstimate]) -> str:
    """One line per layout: per-GPU GiB by component, the peak, and what sits in CPU RAM."""
    head = f"{'layout':<27}{'weights':>8}{'grads':>7}{'optim':>7}{'gather':>7}{'act+log':>8}" \
           f"{'GPU peak':>9}{'CPU':>7}"
    lines = [head]
    for e in estimates:
        g = e.gpu
        rest = e.total - e.model_states  # activations + the backward peak beyond gradients
        cells = [g["weights"] + g["LoRA adapters"], g["gradients"], g["optimizer state"],
                 g["gathered layer"], rest, e.total, sum(e.cpu.values())]
        widths = (8, 7, 7, 7, 8, 9, 7)
        lines.append(f"{e.zero.label:<27}" + "".join(
            f"{v / GIB:>{w}.1f}" for v, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def plot_zero(panels: Mapping[str, Sequence[ZeroEstimate]], budget_gib: float = 80.0) -> Figure:
    """Stacked bars of per-GPU memory, one panel per setup (e.g. full / LoRA / QLoRA).

    Each bar splits the peak into weights (+ adapters), gradients, optimizer state, the layer
    ZeRO-3 gathers, and "activations & logits" (the rest of the peak); the figure above a bar
    is what offload put in CPU RAM. The dashed line is one GPU's memory, `budget_gib`.
    """
    import matplotlib.pyplot as plt

    parts = [("weights + adapters", "tab:blue"), ("gradients", "tab:orange"),
             ("optimizer state", "tab:red"), ("gathered layer", "tab:purple"),
             ("activations & logits", "tab:gray")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False,
                             sharey=True)
    for ax, (title, ests) in zip(axes[0], panels.items(), strict=True):
        for x, e in enumerate(ests):
            g = e.gpu
            values = [g["weights"] + g["LoRA adapters"], g["gradients"], g["optimizer state"],
                      g["gathered layer"], e.total - e.model_states]
            bottom = 0.0
            for (name, color), v in zip(parts, values, strict=True):
                ax.bar(x, v / GIB, bottom=bottom, color=color, label=name if x == 0 else None)
                bottom += v / GIB
            cpu = sum(e.cpu.values()) / GIB
            if cpu:
                ax.text(x, bottom, f"CPU\n{cpu:.1f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(budget_gib, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(ests)), [e.zero.label.replace(" + ", "\n+") for e in ests],
                      fontsize=7, rotation=90)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    axes[0][0].set_ylabel("GiB per GPU")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
