"""tutor.attention: eager keeps (heads, L, L) scores, SDPA does not; masks have the sizes
collate gives each backend."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from tutor.attention import CASES, attention_cost, plot_attention_costs
from tutor.errors import TutorError

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
        eager, sdpa, causal = (costs[c, n] for c in CASES)
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
        assert all(costs[c, n].seconds > 0 for c in CASES)


def test_plot_has_one_line_per_case(costs):
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_attention_costs(list(costs.values()))
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]
    assert list(fig.axes[0].lines[0].get_xdata()) == [128, 256]


def test_bad_input_is_a_tutor_error():
    with pytest.raises(TutorError, match="case must be one of"):
        attention_cost("flash", 64, config=CONFIG)
    with pytest.raises(TutorError, match="samples <= seq_len"):
        attention_cost("sdpa + block mask", 2, samples=4, config=CONFIG)
