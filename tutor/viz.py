"""Pictures of what the model sees: the loss-mask view (terminal and HTML), histograms, packs.

The mask view prints a sample token by token: trained tokens (label ≠ −100) on a
green background, everything else grey, special tokens such as ``<|im_start|>`` shown
in a box so that the template's scaffolding is visible, newlines as ``⏎``. Tokens that
are only part of a UTF-8 character (byte-level BPE splits most Chinese characters into
2–3 tokens) are grouped until they decode to whole characters.

Each mask/histogram function here is self-contained: it takes plain lists and returns a
string. `plot_packing` draws a matplotlib figure (imported inside the function).
Not handled: colour themes, very long samples (everything is printed), images.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tutor.common import IGNORE_INDEX
from tutor.packing import seq_lens

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformers import PreTrainedTokenizerBase

    from tutor.packing import Packs

NEWLINE = "⏎"
ANSI_TRAINED = "\x1b[30;42m"  # black on green
ANSI_SPECIAL = "\x1b[35m"  # magenta
ANSI_CONTEXT = "\x1b[90m"  # grey
ANSI_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Piece:
    """One displayed unit: usually one token; several when they share a character."""

    text: str
    trained: bool
    special: bool
    ids: tuple[int, ...]


def token_pieces(
    input_ids: Sequence[int], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> list[Piece]:
    """Split a sample into displayable pieces; their texts join to the decoded sample."""
    specials = set(tokenizer.all_special_ids)
    pieces: list[Piece] = []
    pending: list[int] = []  # positions waiting to complete a UTF-8 character
    prev: list[int] = []  # the previous token as context (SentencePiece drops a lead space)
    for pos in range(len(input_ids)):
        pending.append(pos)
        ids = [int(input_ids[p]) for p in pending]
        context = _decode(tokenizer, prev)
        text = _decode(tokenizer, prev + ids)[len(context):]
        if text.endswith("\ufffd") and len(pending) < 4 and pos + 1 < len(input_ids):
            continue
        trained = any(labels[p] != IGNORE_INDEX for p in pending)
        special = len(ids) == 1 and ids[0] in specials
        pieces.append(Piece(text, trained, special, tuple(ids)))
        prev, pending = ids[-1:], []
    return pieces


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    if not ids:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def mask_ansi(
    input_ids: Sequence[int],
    labels: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    color: bool = True,
) -> str:
    """The mask view for a terminal. Without colour, trained runs are wrapped in ⟦ ⟧."""
    out: list[str] = []
    in_trained = False
    for piece in token_pieces(input_ids, labels, tokenizer):
        text = piece.text.replace("\n", NEWLINE + "\n")
        if color:
            style = ANSI_TRAINED if piece.trained else (
                ANSI_SPECIAL if piece.special else ANSI_CONTEXT)
            # Colour each line separately so a background never bleeds across a newline.
            out.append("\n".join(f"{style}{line}{ANSI_RESET}" if line else ""
                                 for line in text.split("\n")))
        else:
            if piece.trained != in_trained:
                out.append("⟦" if piece.trained else "⟧")
                in_trained = piece.trained
            out.append(text)
    if in_trained:
        out.append("⟧")
    return "".join(out)


def ansi_legend(color: bool = True) -> str:
    """One line explaining the colours of `mask_ansi`."""
    if not color:
        return "⟦trained⟧  not trained  ⏎ = newline"
    return (f"{ANSI_TRAINED}trained{ANSI_RESET}  {ANSI_CONTEXT}not trained{ANSI_RESET}  "
            f"{ANSI_SPECIAL}<special>{ANSI_RESET}  {NEWLINE} = newline")


_CSS = ("font-family:monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;"
        "word-break:break-all")
_TRAINED = "background:#b7e4b0;color:#000;"
_CONTEXT = "background:#eee;color:#777;"
_SPECIAL = "border:1px solid #a347ba;color:#a347ba;border-radius:3px;"


def mask_html(
    input_ids: Sequence[int], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> str:
    """The mask view as HTML for a notebook (``IPython.display.HTML(mask_html(...))``).

    Every token is a span with a tooltip giving its id(s) and label; a thin white
    border separates tokens, so token boundaries are visible too.
    """
    spans = []
    for piece in token_pieces(input_ids, labels, tokenizer):
        style = (_TRAINED if piece.trained else _CONTEXT) + (_SPECIAL if piece.special else "")
        label = "trained" if piece.trained else "-100"
        title = f"id {', '.join(map(str, piece.ids))} · label {label}"
        body = html.escape(piece.text).replace("\n", NEWLINE + "<br>")
        spans.append(f'<span style="{style}border-right:1px solid #fff" '
                     f'title="{html.escape(title)}">{body}</span>')
    legend = (f'<div style="margin-bottom:4px"><span style="{_TRAINED}">trained</span> '
              f'<span style="{_CONTEXT}">not trained (-100)</span> '
              f'<span style="{_CONTEXT}{_SPECIAL}">special token</span></div>')
    return f'<div style="{_CSS}">{legend}{"".join(spans)}</div>'


def text_histogram(values: Sequence[int], bins: int = 8, width: int = 40) -> str:
    """A horizontal bar histogram of integers (e.g. token lengths) for a terminal.

    >>> print(text_histogram([1, 2, 2, 9], bins=2, width=4))
     1 –  5 | ████ 3
     6 –  9 | █ 1
    """
    if not values:
        return "(no values)"
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))  # ceil, at least one per bin
    counts = [0] * bins
    for v in values:
        counts[min((v - lo) // step, bins - 1)] += 1
    while counts and counts[-1] == 0:
        counts.pop()
    top = max(counts)
    digits = len(str(hi))
    rows = []
    for i, n in enumerate(counts):
        start, end = lo + i * step, min(lo + (i + 1) * step - 1, hi)
        bar = "█" * (round(n / top * width) if n else 0)
        rows.append(f"{start:>{digits + 1}} – {end:>{digits + 1}} | {bar} {n}")
    return "\n".join(rows)


def plot_packing(results: Packs | Mapping[str, Packs], rows: int = 12) -> Figure:
    """One line of panels per packing result: its first `rows` packs, and a fill histogram.

    Left: each pack as a bar of ``max_length`` slots, one colour block per sample, grey
    where the row would be padding. Right: histogram of pack fill (tokens / max_length).
    `results` is one :class:`~tutor.packing.Packs` or ``{"name": Packs, ...}`` to compare.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
        for axis in (ax_rows.yaxis, ax_hist.yaxis):  # packs are counted in whole numbers
            axis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
