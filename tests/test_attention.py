"""tutor.attention: eager keeps (heads, L, L) scores, SDPA does not; masks have the sizes
collate gives each backend; sdpa_varlen equals SDPA with a block mask in forward, backward and
generation, and skips the cross-sample work."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tutor.attention import register
from tutor.course.attention_cost import CASES, attention_cost, plot_attention_costs
from tutor.errors import TutorError
from tutor.packing import collate, pack, seq_lens

HEADS = 8
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=HEADS,
                     num_key_value_heads=2, vocab_size=32)


@pytest.fixture(scope="module")
def costs():
    return {(c, n): attention_cost(c, n, samples=4, config=CONFIG) for c in CASES
            for n in (128, 256)}


def test_eager_keeps_the_score_matrices_and_sdpa_does_not(costs):
    for n in (128, 256):
        scores = HEADS * n * n * 4  # fp32 (heads, L, L), once
        eager, sdpa, causal = (costs[c, n] for c in
                               ("eager + block mask", "sdpa + block mask", "sdpa, causal only"))
        assert eager.peak_bytes - causal.peak_bytes >= 2 * scores  # scores + softmax, kept
        # SDPA with a block mask: its float copy, 4 bytes per (query, key) pair, not per head
        assert 4 * n * n <= sdpa.peak_bytes - causal.peak_bytes < scores / 2
    growth = {c: costs[c, 256].peak_bytes / costs[c, 128].peak_bytes for c in CASES}
    assert growth["eager + block mask"] > 3.5 and growth["sdpa, causal only"] < 2.1  # L² vs L


def test_masks_are_what_collate_hands_each_backend(costs):
    for n in (128, 256):
        assert costs["eager + block mask", n].mask_bytes == 4 * n * n  # float32 (1, 1, L, L)
        assert costs["sdpa + block mask", n].mask_bytes == n * n  # bool (1, 1, L, L)
        assert costs["sdpa, causal only", n].mask_bytes == 0
        assert costs["sdpa_varlen (tutor)", n].mask_bytes == 0
        assert all(costs[c, n].seconds > 0 for c in CASES)


def test_plot_has_one_line_per_case(costs):
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_attention_costs(list(costs.values()))
    assert [len(ax.lines) for ax in fig.axes] == [4, 4]
    assert list(fig.axes[0].lines[0].get_xdata()) == [128, 256]


def test_bad_input_is_a_tutor_error():
    with pytest.raises(TutorError, match="case must be one of"):
        attention_cost("flash", 64, config=CONFIG)
    with pytest.raises(TutorError, match="samples <= seq_len"):
        attention_cost("sdpa + block mask", 2, samples=4, config=CONFIG)


# ---------------------------------------------------------------- sdpa_varlen


def tiny(impl: str) -> LlamaForCausalLM:
    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return LlamaForCausalLM(cfg)


def packed_rows(n_samples: int = 7, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_samples):
        ids = torch.randint(1, 64, (int(torch.randint(3, 15, (1,), generator=g)),), generator=g)
        samples.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return pack(samples, 40, seed=0)


def test_varlen_gradients_equal_the_block_mask():
    packs = packed_rows()
    assert len(packs) >= 2 and len(packs[0]["indices"]) >= 3  # two rows, several samples
    grads = {}
    for impl in ("sdpa", "sdpa_varlen"):
        model = tiny(impl).train()
        out = model(**collate(packs, impl))
        out.loss.backward()
        grads[impl] = (out.loss.detach(), [p.grad for p in model.parameters()])
    (loss_mask, g_mask), (loss_var, g_var) = grads["sdpa"], grads["sdpa_varlen"]
    assert abs(loss_mask.item() - loss_var.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(g_mask, g_var, strict=True)) < 1e-5


@torch.no_grad()
def test_varlen_reads_the_spans_from_position_ids():
    # The control: without restarted position_ids the row is one sequence and samples leak.
    model = tiny("sdpa_varlen").eval()
    row = packed_rows()[:1]
    batch = collate(row, "sdpa_varlen")
    isolated = model(**batch).logits
    leaked = model(**{k: v for k, v in batch.items() if k != "position_ids"}).logits
    first = seq_lens(row[0])[0]
    assert (isolated[0, :first] - leaked[0, :first]).abs().max() < 1e-6  # first sample: same
    assert (isolated - leaked).abs().max() > 1e-2


@torch.no_grad()
def test_varlen_generates_what_sdpa_generates():
    # Generation has a KV cache (and a padding mask for batches): varlen falls back to SDPA.
    prompts = torch.tensor([[0, 0, 5, 9, 13], [3, 7, 11, 2, 8]])  # row 0 left-padded
    mask = (prompts != 0).long()
    out = {impl: tiny(impl).eval().generate(prompts, attention_mask=mask, max_new_tokens=8,
                                            do_sample=False, pad_token_id=0)
           for impl in ("sdpa", "sdpa_varlen")}
    assert torch.equal(out["sdpa"], out["sdpa_varlen"])
    single = {impl: tiny(impl).eval().generate(prompts[1:], max_new_tokens=8, do_sample=False,
                                               pad_token_id=0) for impl in ("sdpa", "sdpa_varlen")}
    assert torch.equal(single["sdpa"], single["sdpa_varlen"])


def test_varlen_is_what_training_picks_without_flash_attn():
    from tutor.train import resolve_attention

    assert resolve_attention("auto") == ("flash_attention_2" if torch.cuda.is_available()
                                         and _flash_importable() else "sdpa_varlen")
    assert resolve_attention("sdpa") == "sdpa"


def _flash_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
