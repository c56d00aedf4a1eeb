"""Pictures for the course: how packs fill their rows.

matplotlib is imported inside each function, so importing this module stays cheap.

Not handled here: interactive plots, saving files (call ``fig.savefig`` yourself).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tutor.packing import Packs


def plot_packing(results: Packs | Mapping[str, Packs], rows: int = 12) -> Figure:
    """One line of panels per packing result: its first `rows` packs, and a fill histogram.

    Left: each pack as a bar of ``max_length`` slots, one colour block per sample, grey
    where the row would be padding. Right: histogram of pack fill (tokens / max_length).
    `results` is one :class:`~tutor.packing.Packs` or ``{"name": Packs, ...}`` to compare.
    """
    import matplotlib.pyplot as plt

    from tutor.packing import seq_lens

    named = dict(results) if isinstance(results, Mapping) else {results.strategy: results}
    fig, axes = plt.subplots(len(named), 2, figsize=(11, 2.6 * len(named)), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for (name, packs), (ax_rows, ax_hist) in zip(named.items(), axes, strict=True):
        for r, p in enumerate(packs[:rows]):
            left = 0
            for k, n in enumerate(seq_lens(p)):
                ax_rows.barh(r, n, left=left, color=colors[k % len(colors)], edgecolor="white")
                left += n
            ax_rows.barh(r, packs.max_length - left, left=left, color="0.85")
        ax_rows.set(xlim=(0, packs.max_length), xlabel="slot", ylabel="pack")
        ax_rows.invert_yaxis()
        ax_rows.set_title(
            f"{name}: {len(packs)} packs (min {packs.min_packs}), "
            f"utilisation {packs.utilisation:.1%}",
            fontsize=10,
        )
        fill = [n / packs.max_length for n in packs.lengths]
        ax_hist.hist(fill, bins=20, range=(0, 1), color="tab:blue")
        ax_hist.set(xlabel="pack fill (tokens / max_length)", ylabel="packs")
    fig.tight_layout()
    return fig
