"""Preference losses on packed pairs: DPO (sigmoid, IPO) and ORPO, with their rewards.

A pair is a prompt x, a chosen answer y_w and a rejected answer y_l. Each answer's
log-probability under a model is the sum over its trained tokens::

    log π(y | x) = Σ_t log softmax(logits_{t-1})[y_t]        (labels ≠ -100 only)

`sequence_logps` computes that sum for every answer of a packed batch at once. The packs come
from `tutor.packing.pack_pairs`: chosen whole, then rejected continuing the prompt's positions
(the prompt computed once), and ``pair_ids`` (B, L) names each token's answer — 2k for the
chosen span of pair k, 2k+1 for its rejected span, -1 for padding. Because the collator sets
the first label of every span to -100, position t-1 always lies in the same span as a
trained label t, so one shift of the whole row serves every answer.

DPO (Rafailov et al. 2023) with a frozen reference π_ref and β > 0::

    r_w = β · (log π(y_w|x) − log π_ref(y_w|x))      "reward" of the chosen answer
    r_l = β · (log π(y_l|x) − log π_ref(y_l|x))
    sigmoid:  loss = −log σ(r_w − r_l)               mean over pairs (= log 2 when π = π_ref)
    ipo:      loss = (Δ/len − 1/(2β))²,  Δ/len = (log π − log π_ref)(y_w)/|y_w|
                                                 − (log π − log π_ref)(y_l)/|y_l|

exactly as TRL 1.16's DPOTrainer (``loss_type="sigmoid"`` has no label smoothing there; its
IPO divides each answer's log-ratio by its number of completion tokens). Logged like TRL:
rewards/chosen = mean r_w, rewards/rejected = mean r_l, rewards/margins = mean (r_w − r_l),
rewards/accuracies = fraction of pairs with r_w > r_l.

ORPO (Hong et al. 2024) needs no reference. With mean log-probs m = log π(y|x) / |y|::

    log odds(y) = m − log(1 − e^m)
    loss = NLL(y_w) − λ · mean log σ(log odds(y_w) − log odds(y_l))

where NLL(y_w) is the mean cross-entropy over all chosen answer tokens of the batch (the SFT
loss on the chosen answers). TRL's experimental ORPOTrainer computes the same odds-ratio
term (its `odds_ratio_loss`, λ = its ``beta``) but its NLL also covers the prompt tokens;
here, as in the paper and in tutor's SFT, only answer tokens are trained. Rewards: λ · m.

Memory: the log-softmax runs over chunks of trained rows (`chunk` rows at a time, each
chunk's fp32 copy only), never over a (B, L, V) fp32 tensor; callers pass logits only at
positions that predict a trained token (`keep_positions`, the model's ``logits_to_keep``).
Not handled: the vocabulary-chunked head of `tutor.chunked_loss` (the logits of the kept
positions are materialised in the compute dtype), other DPO variants of TRL (hinge, robust,
length-desensitised ld_alpha, WPO weighting), label smoothing, and reference log-probs
precomputed once (the reference runs every step, under no_grad).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tutor.common import IGNORE_INDEX
from tutor.errors import TutorError

if TYPE_CHECKING:
    from typing import Any

    import torch

LOSS_TYPES = ("sigmoid", "ipo")
METHODS = ("dpo", "orpo")
LOGP_CHUNK = 256  # rows per log-softmax chunk
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def keep_positions(labels: torch.Tensor) -> torch.Tensor:
    """(K,) positions t whose next label ``labels[:, t+1]`` is trained in some row: the only
    logits the log-probs need (pass as the model's ``logits_to_keep``)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


def token_logps_by_id(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                      n_ids: int, chunk: int = LOGP_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of log p(target | logits row) per id, and the number of rows summed per id.

    logits (B, K, V) already aligned with `targets` (B, K) and `ids` (B, K): row k of
    logits predicts targets[:, k]. Targets equal to -100 are skipped; every other target
    must carry an id in [0, n_ids). Returns (sums (n_ids,) fp32, counts (n_ids,) long).
    """
    import torch

    V = logits.shape[-1]
    flat, tgt, seq = logits.reshape(-1, V), targets.reshape(-1), ids.reshape(-1)
    rows = (tgt != IGNORE_INDEX).nonzero().squeeze(-1)  # (N,) trained rows
    if rows.numel() and not bool(((seq[rows] >= 0) & (seq[rows] < n_ids)).all()):
        raise TutorError(f"sequence_logps: a trained label has a pair id outside 0..{n_ids - 1}")
    sums = torch.zeros(n_ids, dtype=torch.float32, device=logits.device)
    for part in rows.split(chunk):
        z = flat.index_select(0, part).float()  # (c, V): one chunk's fp32 copy
        logp = z.gather(1, tgt[part, None]).squeeze(1) - z.logsumexp(-1)  # (c,)
        sums = sums.index_add(0, seq[part], logp)
    counts = torch.bincount(seq[rows], minlength=n_ids)[:n_ids]
    return sums, counts


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, pair_ids: torch.Tensor,
                   n_pairs: int, chunk: int = LOGP_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer, Σ log p(labels[t] | logits[t-1]) over its trained labels, and their count.

    logits (B, L, V), labels (B, L) in the HF convention (not shifted; -100 = not trained),
    pair_ids (B, L) with 2k / 2k+1 for pair k's chosen / rejected span. Returns
    (sums (2n,), counts (2n,)): even entries chosen, odd entries rejected.
    """
    return token_logps_by_id(logits[:, :-1], labels[:, 1:], pair_ids[:, 1:], 2 * n_pairs,
                             chunk)


def answer_logps(model: Any, batch: dict[str, torch.Tensor], n_pairs: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (2n,), counts (2n,)) of every answer's log-prob in a collated pair batch
    (`tutor.packing.collate` of `pack_pairs`), computing logits only at positions that
    predict a trained token. Gradients flow unless the caller disables them."""
    labels, pair_ids = batch["labels"], batch["pair_ids"]
    keep = keep_positions(labels)  # (K,)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "pair_ids")}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    return token_logps_by_id(logits, labels[:, keep + 1], pair_ids[:, keep + 1], 2 * n_pairs)


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four logged statistics, per pair (detached)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected, "rewards/accuracies": (chosen > rejected).float()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", chosen_counts: torch.Tensor | None = None,
             rejected_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The DPO loss (mean over the n pairs) and the per-pair rewards (module docstring).

    All inputs (n,): summed answer log-probs of policy and reference. ``ipo`` also needs the
    answers' token counts. Returns {"loss": scalar, **REWARD_KEYS → (n,)}.
    """
    import torch.nn.functional as F

    if loss_type not in LOSS_TYPES:
        raise TutorError(f"dpo loss_type: {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_counts is None or rejected_counts is None:
            raise TutorError("dpo loss_type 'ipo' needs the answers' token counts")
        delta = (chosen_ratio / chosen_counts.clamp(min=1)
                 - rejected_ratio / rejected_counts.clamp(min=1))
        losses = (delta - 1 / (2 * beta)) ** 2
    return {"loss": losses.mean(), **_rewards(beta * chosen_ratio, beta * rejected_ratio)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_loss(chosen_sums: torch.Tensor, rejected_sums: torch.Tensor,
              chosen_counts: torch.Tensor, rejected_counts: torch.Tensor,
              lam: float = 0.1) -> dict[str, torch.Tensor]:
    """ORPO: chosen NLL (token mean) − λ · mean log σ(log odds ratio) (module docstring).

    Inputs (n,): summed answer log-probs and token counts of the policy. Returns
    {"loss", "nll_loss", "log_odds_ratio", **REWARD_KEYS}.
    """
    import torch.nn.functional as F

    chosen_mean = chosen_sums.float() / chosen_counts.clamp(min=1)
    rejected_mean = rejected_sums.float() / rejected_counts.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)  # (n,)
    nll = -chosen_sums.sum() / chosen_counts.sum().clamp(min=1)
    return {"loss": nll - lam * ratio.mean(), "nll_loss": nll.detach(),
            "log_odds_ratio": ratio.detach(),
            **_rewards(lam * chosen_mean, lam * rejected_mean)}
