"""The course's exercises for notebooks 04-08: LoRA/QLoRA math, packing, training, merge, chat.

Same rules as `tutor.course.exercises_basics` (helpers from `tutor.course.checks`): each
check computes the expected answer from the package, the bundled model or the course data
when it runs.

Not handled: exercises on a real training run's outputs (they would need the run); 06 asks
about the recipe instead, which the check can rebuild in seconds.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tutor.chat import GenerationSettings, pick_system
from tutor.common import CONFIG_FILE, IGNORE_INDEX
from tutor.course.checks import (
    Hint,
    Verdict,
    as_float,
    as_int,
    bundled_model,
    bundled_tokenizer,
    exercise,
    judge,
    not_a_change,
    right,
    wrong,
)
from tutor.course.pico import SCORED, locate, merged, trained
from tutor.course.sampling import sample_answers
from tutor.data import with_system
from tutor.lora import lora_param_count, merge_lora
from tutor.memory import GIB, KNOWN, Setup, estimate
from tutor.models import load, lora_base_dtype, resolve_precision
from tutor.packing import collate, pack
from tutor.quant import dequantize_nf4, nf4_codebook, quantize_nf4
from tutor.templates import get_template
from tutor.train import build_dataset
from tutor.train_config import ASSISTANT_RECIPE, load_config

# ── 04 LoRA and QLoRA math ────────────────────────────────────────────────────────────


@exercise("04.1", "LoRA r=16 trainable numbers on Llama-2-7B (all 7 projections)")
def _lora_count(answer: Any) -> Verdict:
    arch = KNOWN["llama-2-7b"]
    block = [(i, o) for i, o, _ in arch.block_linears()]
    n = lora_param_count(block * arch.num_layers, 16)
    return judge(as_int(answer), n,
                 why=f"16 · (in + out) summed over 7 linears × {arch.num_layers} blocks = "
                     f"{n:,} ({n / arch.num_params():.2%} of the model)",
                 hint="r · (in + out) for each linear of KNOWN['llama-2-7b'].block_linears(), "
                      "times num_layers",
                 mistakes=[(arch.linear_weights(), "that is every weight of the blocks; LoRA "
                                                   "trains r · (in + out) per linear"),
                           (n // arch.num_layers, f"that is one block: there are "
                                                  f"{arch.num_layers}"),
                           *((lora_param_count(block * arch.num_layers, r),
                              f"that is for r = {r}; use r = 16") for r in (1, 8, 32, 64))])


NF4_BLOCK = [0.9, -0.3, 0.12, -2.0, 1.1, 0.5, 0.0, 0.7]


@exercise("04.2", "the NF4 code of 0.5 in a block of weights", given=NF4_BLOCK)
def _nf4_code(answer: Any) -> Verdict:
    import torch

    i = NF4_BLOCK.index(0.5)
    code = int(quantize_nf4(torch.tensor(NF4_BLOCK)).codes()[i])
    unscaled = int((nf4_codebook() - 0.5).abs().argmin())
    absmax = max(abs(v) for v in NF4_BLOCK)
    level = float(nf4_codebook()[code])
    return judge(as_int(answer, "a code from 0 to 15"), code,
                 why=f"0.5 / absmax {absmax} = {0.5 / absmax}, nearest level {level:+.4f} "
                     f"is code {code}",
                 hint="divide by the block's absmax, then find the nearest of the 16 levels "
                      "of nf4_codebook(); its index (0-15) is the code",
                 mistakes=[(unscaled, "divide by the block's absmax (the largest |value|, "
                                      "here of a negative weight) first"),
                           (code + 1, "codes count from 0: code 0 is -1.0, code 7 is 0.0")])


@exercise("04.3", "the longest sequence at which InternLM2-7B QLoRA fits in 8 GiB")
def _longest_fit(answer: Any) -> Verdict:
    big, lengths = KNOWN["internlm2-chat-7b"], (512, 1024, 1536, 2048)
    totals = {s: estimate(big, Setup(seq_len=s, optimizer="paged_adamw_8bit")).total / GIB
              for s in lengths}
    best = max(s for s in lengths if totals[s] <= 8)
    seq = as_int(answer, "a sequence length")
    if seq not in totals:
        raise Hint(f"pick one of {', '.join(map(str, lengths))}")
    if seq == best:
        return right(f"{best} tokens: {totals[best]:.2f} GiB; the next length needs "
                     f"{totals[lengths[lengths.index(best) + 1]]:.2f} GiB")
    if totals[seq] > 8:
        return wrong(f"at {seq} tokens the estimate is {totals[seq]:.2f} GiB > 8: the logits "
                     "grow with the sequence")
    return wrong(f"{seq} fits ({totals[seq]:.2f} GiB), but a longer one fits too")


# ── 05 packing ────────────────────────────────────────────────────────────────────────


PACK_LENGTHS = [300, 250, 200, 180, 60, 20]
PACK_PAIRS = [5, 1, 3]


def _toy(lengths: list[int]) -> list[dict[str, list[int]]]:
    return [{"input_ids": [7] * n, "labels": [7] * n} for n in lengths]


@exercise("05.1", "utilisation of bfd packing at max_length 512", given=PACK_LENGTHS)
def _bfd_utilisation(answer: Any) -> Verdict:
    bfd = pack(_toy(PACK_LENGTHS), 512, strategy="bfd")
    greedy = pack(_toy(PACK_LENGTHS), 512, strategy="greedy")
    u = bfd.utilisation
    return judge(as_float(answer, "a fraction between 0 and 1"), u, rel=0.005,
                 why=f"{len(bfd)} packs: {sum(PACK_LENGTHS)} tokens / ({len(bfd)} × 512) = "
                     f"{u:.3f}",
                 hint="sort longest first, put each sample into the open pack it fills most "
                      "tightly, then real tokens / (packs × 512)",
                 mistakes=[(greedy.utilisation, "that is greedy (in the given order); bfd "
                                                "sorts longest first and fills the tightest "
                                                "pack"),
                           (1.0, "every pack counts as a full row of 512 slots, used or not"),
                           (100 * u, "give a fraction (0.9), not a percentage")])


@exercise("05.2", "allowed (query, key) pairs in a pack of 5, 1 and 3 tokens",
          given=PACK_PAIRS)
def _allowed_pairs(answer: Any) -> Verdict:
    row = sum(PACK_PAIRS)
    mask = collate(pack(_toy(PACK_PAIRS), row, strategy="greedy").packs)["attention_mask"]
    n = int(mask.sum())
    return judge(as_int(answer), n, why=f"Σ n(n+1)/2 = {n}, of {row * (row + 1) // 2} a plain "
                                        "causal mask would allow",
                 hint="each sample is a causal block of its own: n(n+1)/2 pairs per sample",
                 mistakes=[(row * (row + 1) // 2, "that is a plain causal mask over the whole "
                                                  "row; samples may not see each other"),
                           (sum(k * k for k in PACK_PAIRS), "inside a sample attention is still "
                                                            "causal: n(n+1)/2, not n²"),
                           (row * row, "that is every pair of the row")])


MASK_LENGTHS = [2, 4, 3]


@exercise("05.3", "build the block-diagonal causal mask of a pack from its sample lengths",
          given=MASK_LENGTHS)
def _block_mask(answer: Any) -> Verdict:
    import torch

    row = sum(MASK_LENGTHS)
    want = collate(pack(_toy(MASK_LENGTHS), row, strategy="greedy").packs)["attention_mask"][0, 0]
    try:
        got = torch.as_tensor(answer)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise Hint(f"give a {row} × {row} tensor (or nested list) of 0/1 or True/False") from exc
    if got.dim() == 4 and got.shape[:2] == (1, 1):
        got = got[0, 0]  # the (B, 1, L, L) form collate returns
    if got.shape != want.shape:
        return wrong(f"the mask is (query, key) = ({row}, {row}) for a row of {row} tokens, "
                     f"not {tuple(got.shape)}")
    got = got != 0
    if torch.equal(got, want):
        return right(f"{int(want.sum())} allowed (query, key) pairs: a causal triangle per "
                     "sample, nothing across samples — what collate builds")
    blocks = torch.block_diag(*(torch.ones(n, n) for n in MASK_LENGTHS)).bool()
    mistakes = [(torch.ones(row, row).tril().bool(), "that is a plain causal mask over the "
                                                     "whole row: samples may not see each other"),
                (blocks, "inside a sample attention is still causal: key j ≤ query i"),
                (want.T, "rows are queries, columns keys: query i may see keys j ≤ i")]
    for value, hint in mistakes:
        if torch.equal(got, value):
            return wrong(hint)
    i, j = (int(k) for k in (got != want).nonzero()[0])
    return wrong(f"query {i}, key {j}: yours says {'attend' if got[i, j] else 'blocked'}; "
                 "a query attends to a key only in its own sample and not after itself")


# ── 06 QLoRA training ─────────────────────────────────────────────────────────────────




def _scale_inputs() -> dict[str, Any]:
    """A (64, 64) weight (std 0.02), an input x, and rank-64 LoRA factors A, B of a trained
    adapter's size, fixed by a seed: the input of exercise 06.1. Rank r uses A[:r], B[:, :r]."""
    import torch

    g = torch.Generator().manual_seed(6)
    return {"W": torch.randn(64, 64, generator=g) * 0.02, "x": torch.randn(64, generator=g),
            "A": torch.randn(64, 64, generator=g) / 8, "B": torch.randn(64, 64, generator=g) * 1e-3,
            "settings": [(4, 32, False), (64, 16, False), (64, 16, True)]}  # (r, alpha, rslora)


def _update_ratio(r: int, alpha: float, scale: float) -> float:
    """|scale · B[:, :r] A[:r] x| / |W x| for `_scale_inputs`."""
    g = _scale_inputs()
    delta = scale * g["B"][:, :r] @ g["A"][:r]  # (out, in)
    return float((delta @ g["x"]).norm() / (g["W"] @ g["x"]).norm())


@exercise("06.1", "what the LoRA scale alpha/r does to the size of the update",
          given=_scale_inputs())
def _lora_scale(answer: Any) -> Verdict:
    settings = _scale_inputs()["settings"]
    if not (isinstance(answer, (list, tuple)) and len(answer) == len(settings)):
        raise Hint(f"give {len(settings)} numbers, one per (r, alpha, rslora) setting, in order")
    got = [as_float(v) for v in answer]
    scales = [alpha / (math.sqrt(r) if rs else r) for r, alpha, rs in settings]
    want = [_update_ratio(r, alpha, s) for (r, alpha, _), s in zip(settings, scales, strict=True)]
    close = [abs(g - w) <= 1e-3 * w for g, w in zip(got, want, strict=True)]
    if all(close):
        return right(f"|ΔW x| / |W x| = {want[0]:.3f}, {want[1]:.4f}, {want[2]:.3f}: at scale "
                     f"{scales[0]:g} (r=4, α=32) the update moves the layer "
                     f"{want[0] / want[1]:.0f}× more than at XTuner's {scales[1]:g} (r=64, "
                     f"α=16) with 16× fewer directions; rsLoRA's α/√r = {scales[2]:g} gives "
                     f"the rank-64 update {want[2] / want[1]:.0f}× XTuner's size. The scale "
                     "acts like a learning-rate factor on the adapter: change r and α together")
    plain = [_update_ratio(r, alpha, 1.0) for r, alpha, _ in settings]
    if all(abs(g - w) <= 1e-3 * w for g, w in zip(got, plain, strict=True)):
        return wrong("multiply B·A by the scale: alpha / r (alpha / √r with rsLoRA)")
    nors = _update_ratio(64, 16, 16 / 64)
    if close[0] and close[1] and abs(got[2] - nors) <= 1e-3 * nors:
        return wrong("rsLoRA's scale is alpha / √r, not alpha / r")
    return wrong("for each setting: ΔW = scale · B[:, :r] @ A[:r], then the norm of ΔW @ x "
                 "divided by the norm of W @ x")


@exercise("06.2", "optimizer steps of the recipe with data.max_length=256")
def _recipe_steps(answer: Any) -> Verdict:
    cfg = load_config(ASSISTANT_RECIPE, ["data.max_length=256"])
    dataset, _, reports = build_dataset(cfg, bundled_tokenizer())
    packs, samples, t = len(dataset), sum(r.kept for r in reports), cfg.train
    # transformers.Trainer: ceil(batches / grad_accum) steps per epoch, ceil(epochs × that)
    per_epoch = math.ceil(math.ceil(packs / t.batch_size) / t.grad_accum)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)
    shipped = load_config(ASSISTANT_RECIPE)
    full = math.ceil(shipped.train.epochs * len(build_dataset(shipped, bundled_tokenizer())[0]))
    return judge(as_int(answer), steps,
                 why=f"{packs} packs of ≤ {cfg.data.max_length} tokens per epoch × "
                     f"{t.epochs:g} epochs = {steps} steps ({full} at 512 tokens: shorter "
                     "packs hold fewer samples, so more steps see the same data)",
                 hint="a step sees batch_size packs: pack the encoded samples at 256 tokens "
                      "(build_dataset of the overridden recipe), then times the epochs",
                 mistakes=[(per_epoch, f"that is one epoch; the recipe runs {t.epochs:g}"),
                           (full, "that is the recipe at 512 tokens: override data.max_length"),
                           (math.ceil(t.epochs * samples), "a step sees one pack, not one "
                                                           "sample: the samples are packed "
                                                           "into fewer rows first"),
                           (samples, "a step sees one pack (several samples), and the recipe "
                                     "runs several epochs")])


@exercise("06.3", "change one thing in the recipe: what does it do to the forgetting probe?")
def _probe_experiment(answer: Any) -> Verdict:
    if not (isinstance(answer, tuple) and len(answer) == 2):
        raise Hint("answer with a pair: (the list of overrides you trained with, your run's "
                   "probe answer loss minus the shipped recipe's)")
    overrides, change = answer
    same = not_a_change(overrides, "train.epochs=1",
                        lambda o: locate(overrides=o).root == locate().root)
    if same:
        return same
    run, shipped = locate(overrides=overrides), locate()
    files = {"yours": run.root / "scores.json", "the shipped recipe's": shipped.root /
             "scores.json"}
    for who, path in files.items():
        if not path.is_file():
            return wrong(f"{who} run is not scored yet: run scored(trained(overrides=...)) "
                         "for it first (training takes minutes)")
    yours, base = (json.loads(f.read_text(encoding="utf-8"))["after"][SCORED[1]]
                   for f in files.values())
    delta = yours["answer_loss"] - base["answer_loss"]
    return judge(as_float(change, "a loss difference"), delta, rel=1e-3,
                 why=f"with {overrides} the probe answer loss is {yours['answer_loss']:.3f} "
                     f"against {base['answer_loss']:.3f} ({delta:+.3f}); probe hits "
                     f"{yours['hits']} vs {base['hits']}, answers naming the identity "
                     f"{yours['identity_mentions']} vs {base['identity_mentions']}",
                 hint="scored(...)['after'][SCORED[1]]['answer_loss'] of your run minus the "
                      "same number of the shipped recipe (the table above)",
                 mistakes=[(-delta, "the other way round: yours minus the shipped recipe's"),
                           (yours["answer_loss"], "that is your loss alone: subtract the "
                                                  "shipped recipe's")])


# ── 07 merge ──────────────────────────────────────────────────────────────────────────


MERGE_BY_HAND = {"W": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # (out 2, in 3)
                 "A": [[1.0, 2.0, 0.0]],  # (r 1, in 3)
                 "B": [[0.5], [0.0]],  # (out 2, r 1)
                 "alpha": 4, "r": 1}


@exercise("07.1", "merge W' = W + (alpha/r)·B·A by hand", given=MERGE_BY_HAND)
def _merge_by_hand(answer: Any) -> Verdict:
    import torch

    g = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in MERGE_BY_HAND.items()}
    merged = merge_lora(g["W"], g["A"], g["B"], g["alpha"], g["r"])
    try:
        got = torch.as_tensor(answer, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise Hint("give W' as a nested list of numbers, e.g. [[1, 0, 0], [0, 1, 0]]") from exc
    if got.shape != merged.shape:
        return wrong(f"W' has W's shape (out, in) = {tuple(merged.shape)}, not {tuple(got.shape)}")
    if torch.allclose(got, merged):
        return right(f"W' = {merged.tolist()}: a rank-{g['r']} update folded into W")
    mistakes = [(g["W"] + g["B"] @ g["A"], f"multiply B·A by the scale alpha / r = "
                                           f"{g['alpha'] / g['r']:g}"),
                (merged - g["W"], "that is only ΔW: add the original weight W")]
    for value, hint in mistakes:
        if torch.allclose(got, value):
            return wrong(hint)
    return wrong("B (out × r) @ A (r × in) gives an (out × in) update; scale it by alpha / r "
                 "and add W")


FLIP_PROMPTS = ["Who are you?", "Give me one tip for learning a new language.",
                "What is the capital of Japan?"]  # 07.2: asked with Pico's system prompt


def _next_token_flips(prompts: list[str]) -> tuple[int, int]:
    """(positions whose most likely next token differs between fp32 base + Pico's adapter
    (= the default merge, within 1e-4) and NF4 base + adapter (what QLoRA trained), all
    prompt positions)."""
    import torch
    from peft import PeftModel

    pico = trained(echo=lambda _: None)
    cfg = load_config(pico.run / CONFIG_FILE)
    fp, tok = load(pico.base_model)
    nf4, _ = load(pico.base_model, bits=4, dtype=lora_base_dtype(resolve_precision("auto")))
    top = []
    for model in (fp, nf4):
        model = PeftModel.from_pretrained(model, str(pico.run))
        rows = []
        for q in prompts:
            text = tok.apply_chat_template(with_system([{"role": "user", "content": q}],
                                                       cfg.system), tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                rows.append(model(**ids).logits[0].argmax(-1))  # (T,)
        top.append(torch.cat(rows))
    return int((top[0] != top[1]).sum()), len(top[0])


@exercise("07.2", "how often the fp32 merge and the trained NF4 model disagree on the next token",
          given=FLIP_PROMPTS)
def _train_deploy_flips(answer: Any) -> Verdict:
    flips, positions = _next_token_flips(FLIP_PROMPTS)
    share, got = flips / positions, as_float(answer, "a share between 0 and 1")
    if abs(got - share) <= 1.01 / positions:  # one position either way: a merged copy rounds
        got = share  # differently from base + adapter (1e-4), which can flip a near-tie
    return judge(got, share, rel=1e-9,
                 why=f"{flips} of {positions} positions ({share:.1%}) get another most likely "
                     "next token: the "
                     "model you deploy after a default merge is not quite the one QLoRA "
                     "trained; merge --base-from-nf4 deploys the trained one",
                 hint="for each prompt (chat template, Pico's system prompt, generation prompt) "
                      "take logits.argmax(-1) at every position under both models and count "
                      "where they differ, over all positions of all prompts",
                 mistakes=[(1 - share, "that is the share that agrees; count the flips")])


def _nf4_merge_inputs() -> dict[str, Any]:
    """A (256, 256) weight like a trained layer's (std 0.02) and a LoRA-sized update (1 % of
    it), fixed by a seed: the input of exercise 07.3."""
    import torch

    g = torch.Generator().manual_seed(7)
    w = torch.randn(256, 256, generator=g) * 0.02
    return {"W": w, "delta": torch.randn(256, 256, generator=g) * 0.02 * 0.01}


def _nf4_round_trip(x: Any) -> Any:
    return dequantize_nf4(quantize_nf4(x))


@exercise("07.3", "does a merged update survive rounding to NF4? Measure the kept part",
          given=_nf4_merge_inputs())
def _merge_precision(answer: Any) -> Verdict:
    g = _nf4_merge_inputs()
    w, delta = g["W"], g["delta"]
    merged4, base4 = _nf4_round_trip(w + delta), _nf4_round_trip(w)
    kept = merged4 - base4  # what the 4-bit merged model holds of the update
    slope = float((kept * delta).sum() / (delta * delta).sum())
    noise = float((kept - delta).norm() / delta.norm())
    exact = float((merged4 - w - delta).norm() / delta.norm())
    return judge(as_float(answer), slope, rel=1e-3,
                 why=f"the kept update NF4(W+Δ) − NF4(W) projects onto Δ with slope "
                     f"{slope:.2f}: no bias, the update survives, with noise {noise:.1f}× |Δ|. "
                     f"Against the exact W+Δ the error is {exact:.1f}× |Δ|, but that is NF4's "
                     "rounding of W itself, present with no update at all",
                 hint="kept = roundtrip(W + delta) − roundtrip(W); answer "
                      "(kept * delta).sum() / (delta * delta).sum()",
                 mistakes=[(exact, "that compares with the exact W + delta, which mixes in "
                                   "NF4's rounding of W; subtract roundtrip(W) instead"),
                           (noise, "that is the noise around the update; measure its "
                                   "slope along delta"),
                           (float(((merged4 - w) * delta).sum() / (delta * delta).sum()),
                            "subtract roundtrip(W), not W: compare two roundings")])


# ── 08 chat ───────────────────────────────────────────────────────────────────────────


ITALY = ("What is the capital of Italy?", "The capital of Italy is Rome.")


def _answer_loss(template: str, question: str, reference: str) -> float:
    """Mean NLL of `reference` after `question` rendered with `template` (notebook 08)."""
    import torch

    tok = bundled_tokenizer()
    prompt = get_template(template, tokenizer=tok).render(
        [{"role": "user", "content": question}], add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    answer_ids = tok.encode(reference, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + answer_ids])
    with torch.inference_mode():
        return bundled_model()(input_ids=ids, labels=labels).loss.item()


@exercise("08.1", "how many times higher the answer loss is with llama2_chat than chatml",
          given=ITALY)
def _template_penalty(answer: Any) -> Verdict:
    ratio = _answer_loss("llama2_chat", *ITALY) / _answer_loss("chatml", *ITALY)
    got = as_float(answer, "a ratio")
    if abs(got - ratio) <= 0.02 * ratio:
        return right(f"{ratio:.1f}×: a foreign format makes the right answer far less likely")
    france = ("What is the capital of France?", "The capital of France is Paris.")
    return judge(got, ratio, rel=0.02, why="",  # only the mistakes are left to tell apart
                 hint="score 'The capital of Italy is Rome.' after each prompt as in the "
                      "notebook, then loss(llama2_chat) / loss(chatml)",
                 mistakes=[(1 / ratio, "you divided the other way round: llama2_chat / chatml"),
                           (_answer_loss("llama2_chat", *france) / _answer_loss("chatml", *france),
                            "that is the France question; score the Italy answer")])


SAMPLING = {"question": "Give me one tip for learning a new language.", "seeds": [0, 1, 2, 3, 4],
            "temperature": 1.0, "top_p": 0.8, "max_new_tokens": 32}


@exercise("08.2", "distinct answers of Pico sampled at temperature 1.0, top-p 0.8",
          given=SAMPLING)
def _sampled_answers(answer: Any) -> Verdict:
    pico = merged(echo=lambda _: None)
    model, tok = load(pico.merged)
    settings = GenerationSettings(max_new_tokens=SAMPLING["max_new_tokens"],
                                  temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"])
    answers = sample_answers(model, tok, SAMPLING["question"], settings, SAMPLING["seeds"],
                             system=pick_system(str(pico.merged), None, None))
    distinct = len(set(answers))
    return judge(as_int(answer), distinct,
                 why=f"{distinct} different answers of {len(answers)} seeds: each seed draws its "
                     "own tokens; top-p 0.8 only limits each draw to the likeliest tokens that "
                     "make up 80 % of the probability, so "
                     + ("every seed still wrote its own answer" if distinct == len(answers)
                        else "some seeds met on the same answer"),
                 hint="sample_answers(model, tokenizer, question, GenerationSettings(...), "
                      "seeds, system=...) with the given values, then len(set(answers))",
                 mistakes=[(len(answers), "that counts every sample; count the different ones")])
