"""Measuring the memory of a real training step, to check tutor.memory's arithmetic.

Numbers counted on torch's own tensors (per distinct storage):

- `tensor_bytes`: what the model and optimizer hold, split like the estimate (weights incl.
  NF4 quantisation state, trainable adapters, gradients, optimizer state);
- `measure_step`: the peak of live tensor bytes over one forward + backward + optimizer step,
  followed op by op with a dispatch mode (`peak_tracker`) that sees every tensor torch
  creates and frees;
- `optimizer_held_bytes`: what an optimizer holds on this process, incl. DeepSpeed ZeRO's
  fp32 master partition (checks tutor.course.zero's per-rank shard);
- `peak_rss_bytes`: the process's peak resident memory, for benchmarks that compare whole
  processes.

Why not tracemalloc or RSS: tracemalloc does not see torch's allocations at all, and RSS adds
the allocator's caches, the Python heap and shared libraries, and keeps the high-water mark of
model loading. What this does NOT see: allocator overhead and fragmentation, memory allocated
outside torch (e.g. by a C library directly), and the CUDA context on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _quant_state_tensors(state: object) -> list[torch.Tensor]:
    """The tensors inside a bitsandbytes QuantState (absmax, codes, offset, nested state)."""
    import torch

    found = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "absmax"):  # the nested QuantState of double quantisation
            found += _quant_state_tensors(value)
    return found


def tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 ) -> dict[str, int]:
    """Measured bytes of distinct storages, by the estimator's components.

    weights = frozen parameters + buffers + NF4 quantisation state; "LoRA adapters" = trainable
    parameters (all of them in full fine-tuning: compare with weights + adapters then);
    gradients = `.grad` tensors now present; optimizer state = the optimizer's state tensors.
    """
    import torch

    seen: set[int] = set()

    def size(tensors: list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            if _storage_key(t) not in seen:
                seen.add(_storage_key(t))
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad] + list(model.buffers())
    for p in params:
        if getattr(p, "quant_state", None) is not None:
            frozen += _quant_state_tensors(p.quant_state)
    states = [v for s in (optimizer.state.values() if optimizer else []) for v in s.values()
              if isinstance(v, torch.Tensor)]
    return {
        "weights": size(frozen),
        "LoRA adapters": size([p for p in params if p.requires_grad]),
        "gradients": size([p.grad for p in params if p.grad is not None]),
        "optimizer state": size(states),
    }


def optimizer_held_bytes(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """Bytes an optimizer holds beyond the model, on this process.

    Its state tensors (Adam's moments) plus the parameters it updates that are not the
    model's own: DeepSpeed ZeRO's fp32 master partitions. For a plain torch optimizer that is
    just the state; under ZeRO-1/2/3 it is this rank's share (tests/test_train.py checks that
    two ranks of ZeRO-2 each hold half).
    """
    import torch

    own = {id(p) for p in model.parameters()}
    tensors = [v for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor)]
    tensors += [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
    storages = {_storage_key(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_tracker() -> Any:
    """A dispatch mode that adds up bytes of storages created while active (and freed again).

    ``with (t := peak_tracker()): ...`` then ``t.peak`` is the most bytes of tensors created
    inside the block and alive at the same moment (tensors made before it are not counted).
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class PeakTracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.sizes: dict[int, int] = {}

        def _release(self, key: int) -> None:
            self.live -= self.sizes.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # outputs that alias an input (views, in-place updates) are not new memory
            inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage, key = t.untyped_storage(), _storage_key(t)
                if key in inputs or key in self.sizes or storage.nbytes() == 0:
                    continue
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key)
            return out

    return PeakTracker()


@dataclass(frozen=True)
class Measurement:
    persistent: dict[str, int]  # tensor_bytes before the step (+ gradients after backward)
    peak: int  # persistent bytes + the highest count of bytes created during the step


def measure_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 batch: dict[str, torch.Tensor], loss_fn: Any = None) -> Measurement:
    """Run one training step (forward, backward, optimizer step) and measure its memory.

    Call it after a first step, so the optimizer state already exists, as in steady training.
    Peak = bytes of tensors alive before the step + the most bytes of tensors created during
    it and alive at the same moment, counted per storage as the ops create and free them.
    This sees every tensor torch allocates (tracemalloc does not) and nothing else: not the
    allocator's caching or fragmentation, not Python objects. `loss_fn(model, batch)` replaces
    ``model(**batch).loss`` (e.g. `tutor.chunked_loss.causal_lm_loss`).
    """
    optimizer.zero_grad(set_to_none=True)
    persistent = tensor_bytes(model, optimizer)
    tracker = peak_tracker()
    with tracker:
        (loss_fn(model, batch) if loss_fn else model(**batch).loss).backward()
        persistent["gradients"] = tensor_bytes(model)["gradients"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    static = sum(v for k, v in persistent.items() if k != "gradients")
    return Measurement(persistent, static + tracker.peak)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (Linux: VmHWM).

    Not `ru_maxrss`: a child started by fork + exec inherits its parent's ru_maxrss, so a
    benchmark that loads a model and then runs each configuration in a child would report
    at least the parent's peak for every child. Elsewhere falls back to ru_maxrss.
    """
    import resource
    import sys
    from pathlib import Path

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
