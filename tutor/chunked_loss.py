"""Cross-entropy over the vocabulary in chunks of rows: no [tokens, vocab] logits in memory.

A causal LM's loss projects every trained position's final hidden state onto the vocabulary
and takes the cross-entropy there. Done in one piece, that is the largest activation of a
fine-tuning step: for K trained tokens it materialises the logits [K, V] in the compute dtype,
their fp32 copy, the fp32 log-softmax kept for backward and, in backward, the fp32 gradient
and its compute-dtype cast (InternLM2-7B at 2,048 tokens: 2,048 x 92,544 x 12 bytes = 2.1 GiB).
Here the rows go through in chunks of `chunk` rows::

    for each chunk c of rows (c x H hidden states, their targets):
        z   = h_c @ W.T                      (c, V) compute dtype, then fp32
        lse = logsumexp(z)                   (c,)
        loss_sum += lse - z[target]          (trained rows only)
        g   = softmax(z) - onehot(target)    (c, V) fp32, in place of z; 0 on untrained rows
        dh_c = g @ W                         (c, H)  kept for backward
        dW  += g.T @ h_c                     (V, H)  only if W requires grad (full FT)

and only one chunk's [c, V] buffers exist at a time. The gradients are computed in the
forward pass and kept (dh: K x H, the size of the hidden states themselves; dW: the size of
W, allocated only when W trains): this is 3 matmuls per chunk. The alternative, keeping only
the log-sum-exp and recomputing z in backward, costs a 4th matmul of the same size per chunk
for no memory gain at the step's peak (dh is as small as the input; dW exists from the start
of backward either way). Measured (2-core AVX2 AMD EPYC, fp32, K=2,048 rows, H=576,
V=49,152, forward + backward, best of 3, shared machine): one-piece F.cross_entropy 4.8 s and
1,152 MiB peak of live tensors; grads-in-forward 5.1 s (chunk 1,024, 389 MiB) / 5.5 s
(chunk 256, 101 MiB); recompute-in-backward 6.7 s / 7.6 s at the same peaks. Backward then
only scales the stored gradients by the incoming scalar gradient.

The loss is the *sum* over trained rows; the caller divides by the token count it wants
(`chunked_ce` does what transformers' ``ForCausalLMLoss`` does: mean over trained tokens,
or sum / ``num_items_in_batch`` under gradient accumulation). Targets equal to
``ignore_index`` (-100) contribute no loss and no gradient. No trained row: the sum is 0, so
the mean is 0/0 = nan, exactly as ``torch.nn.functional.cross_entropy`` gives transformers,
and every gradient is 0.

Precision follows what the unchunked path computes: the projection runs in the compute dtype
(the autocast dtype when autocast is on, else the hidden states' dtype), log-softmax and the
gradient of the logits in fp32, the gradient cast back to the compute dtype before its two
matmuls (as autograd does behind ``logits.float()``). dW is accumulated in fp32.

Not handled: a bias on the output projection, logit soft-capping or scaling (Gemma 2,
Cohere), label smoothing, z-loss, and tensor-parallel vocabularies. `output_head` refuses
models whose head is not a bias-free ``nn.Linear`` or that scale their logits
(``train.chunked_loss: auto`` then falls back to the model's own loss).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tutor.common import IGNORE_INDEX as IGNORE
from tutor.errors import TutorError

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK = 256  # rows per chunk: bench/results/chunked_loss.md (lowest peak, not slower)


def _chunk_step(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor, need_grad: bool,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sum of one chunk and, if asked, the compute-dtype gradient of its logits.

    h: (c, H) and w: (V, H) in the compute dtype; target: (c,) int64 with -100 = untrained.
    Returns (sum of the chunk's trained rows' losses as an fp32 scalar, g (c, V) or None).
    """
    import torch

    z = (h @ w.T).float()  # (c, V) fp32: a fresh tensor (h @ w.T is freed or is z itself)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    trained = target != IGNORE  # (c,)
    safe = torch.where(trained, target, 0)  # gather needs a valid index on untrained rows
    picked = z.gather(1, safe[:, None]).squeeze(1)  # (c,)
    loss = torch.where(trained, lse - picked, 0.0).sum()
    if not need_grad:
        return loss, None
    z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    z[trained, target[trained]] -= 1.0  # - onehot(target)
    z[~trained] = 0.0
    return loss, z.to(h.dtype)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the unchunked lm_head matmul would run in: autocast's, else the input's."""
    import torch

    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _make_function():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """sum of CE(hidden @ weight.T, targets) over trained rows; grads computed in forward."""

        @staticmethod
        def forward(ctx, hidden, weight, target, chunk, dtype, need_h, need_w):
            # hidden (K, H), weight (V, H), target (K,); need_*: that input gets a gradient
            need = need_h or need_w
            w = weight.to(dtype)  # one cast for all chunks (autocast also casts once per call)
            d_hidden = torch.zeros_like(hidden) if need_h else None
            d_weight = torch.zeros(weight.shape, dtype=torch.float32,
                                   device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit
                for start in range(0, hidden.shape[0], chunk):
                    h = hidden[start:start + chunk].to(dtype)  # (c, H)
                    loss, g = _chunk_step(h, w, target[start:start + chunk], need)
                    total += loss
                    if need_h:
                        d_hidden[start:start + chunk] = g @ w  # (c, H)
                    if need_w and dtype == torch.float32:
                        d_weight.addmm_(g.T, h)  # (V, H), no temporary
                    elif need_w:
                        d_weight.add_(g.T @ h)  # (V, H) compute-dtype product, fp32 sum
            ctx.save_for_backward(d_hidden, d_weight)
            ctx.weight_dtype = weight.dtype
            # no trained row: the gradients are exactly 0 whatever flows back (the mean's
            # 0/0 sends back inf; 0 * inf would be nan, while torch's cross_entropy gives 0)
            ctx.nothing_trained = not bool((target != IGNORE).any())
            return total

        @staticmethod
        def backward(ctx, grad_total):  # grad_total: () scalar
            d_hidden, d_weight = ctx.saved_tensors
            if ctx.nothing_trained:
                grad_total = torch.zeros_like(grad_total)
            gh = d_hidden * grad_total.to(d_hidden.dtype) if d_hidden is not None else None
            gw = (d_weight * grad_total).to(ctx.weight_dtype) if d_weight is not None else None
            return gh, gw, None, None, None, None, None

    return ChunkedCrossEntropy


_FUNCTION = None


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Sum over rows of cross-entropy(hidden @ weight.T, target), never all logits at once.

    hidden: (K, H) final hidden states (after the final norm) of the positions to score;
    weight: (V, H) the output projection (lm_head.weight); target: (K,) next-token ids,
    -100 = not trained. Returns an fp32 scalar; differentiable in hidden and weight
    (whichever requires grad). `chunk` rows of (chunk, V) logits exist at a time.
    """
    global _FUNCTION
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if _FUNCTION is None:
        _FUNCTION = _make_function()
    import torch

    grad = torch.is_grad_enabled()  # evaluation (no_grad) computes no gradient at all
    return _FUNCTION.apply(hidden, weight, target, chunk, _compute_dtype(hidden),
                           grad and hidden.requires_grad, grad and weight.requires_grad)


def chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
               num_items_in_batch: torch.Tensor | int | None = None,
               chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on already-shifted targets, computed in chunks.

    hidden: (..., H) and target: (...) of the same leading shape (e.g. (B, K, H) and the
    collator's ``shift_labels`` (B, K)). Only trained rows (target != -100) are gathered and
    scored. Mean over trained tokens, or sum / `num_items_in_batch` when given (gradient
    accumulation), like ``transformers.loss.loss_utils.fixed_cross_entropy``.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    target = target.reshape(-1).to(hidden.device)  # (N,)
    trained = target != IGNORE
    total = chunked_ce_sum(hidden[trained], weight, target[trained], chunk)
    if num_items_in_batch is None:
        return total / trained.sum()  # 0 trained tokens: 0/0 = nan, as in transformers
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ---------------------------------------------------------------- through a causal LM


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside `model`'s wrappers (DDP / DeepSpeed engine, peft)."""
    while hasattr(model, "module"):  # DistributedDataParallel, DeepSpeedEngine
        model = model.module
    if hasattr(model, "get_base_model"):  # peft's PeftModel: LoRA layers sit inside it
        model = model.get_base_model()
    return model


def output_head(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """(attribute name, module) of the causal LM's output projection; a bias-free Linear."""
    import torch

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    name = next((n for n, child in lm.named_children() if child is head), None)
    if name is None or type(head) is not torch.nn.Linear or head.bias is not None:
        raise TutorError(f"chunked loss: {type(lm).__name__}'s output head is not a bias-free "
                         "nn.Linear; set train.chunked_loss=false")
    if getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.config, "logit_scale",
                                                                      None):
        raise TutorError(f"chunked loss: {type(lm).__name__} scales or soft-caps its logits, "
                         "which the chunked loss does not; set train.chunked_loss=false")
    return name, head


@contextmanager
def _head_off(model: torch.nn.Module):
    """Swap the output head for nn.Identity, so the model returns hidden states as "logits".

    Why swap instead of calling the decoder directly: the forward still goes through every
    wrapper (DDP's gradient-sync hooks, DeepSpeed, peft), and transformers still does its own
    ``logits_to_keep`` gather; only the [tokens, vocab] projection is skipped.
    """
    import torch

    lm = causal_lm(model)
    name, head = output_head(model)
    setattr(lm, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(lm, name, head)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, Any],
                   num_items_in_batch: torch.Tensor | int | None = None,
                   chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The model's causal-LM loss on `batch`, with the vocabulary projection chunked.

    `batch` as `tutor.packing.PackCollator` makes it: ``labels`` (B, L) and, with
    ``keep_logits=True``, ``logits_to_keep`` (K,) positions and their targets ``shift_labels``
    (B, K); without them every position is kept and the targets are ``labels`` shifted by one.
    The rest (input_ids, position_ids, attention_mask) goes to the model unchanged.
    Equal to ``model(**batch).loss`` (tests/test_chunked_loss.py).
    """
    import torch

    inputs = dict(batch)
    labels = inputs.pop("labels")
    targets = inputs.pop("shift_labels", None)  # (B, K)
    if targets is None:  # no collator help: every position, target = the next label
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, L)
        inputs.pop("logits_to_keep", None)
    with _head_off(model) as head:
        hidden = model(**inputs).logits  # (B, K, H): the head was Identity
    return chunked_ce(hidden, head.weight, targets, num_items_in_batch, chunk)
