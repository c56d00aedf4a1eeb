"""Mask views and the terminal histogram: exact strings for a small ChatML sample."""

from __future__ import annotations

import pytest

from tutor.data import encode
from tutor.viz import (
    ANSI_CONTEXT,
    ANSI_RESET,
    ANSI_SPECIAL,
    ANSI_TRAINED,
    mask_ansi,
    mask_html,
    text_histogram,
    token_pieces,
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tutor.models import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))


MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": "峰?"},
        {"role": "assistant", "content": "珠峰"}]


def test_pieces_group_partial_characters_and_join_to_the_text(tok):
    sample = encode(MSGS, tok)
    pieces = token_pieces(sample["input_ids"], sample["labels"], tok)
    assert "".join(p.text for p in pieces) == tok.decode(sample["input_ids"])
    assert sum(len(p.ids) for p in pieces) == len(sample["input_ids"])
    by_text = {p.text: p for p in pieces}
    assert len(by_text["峰"].ids) > 1  # one character, several byte-level tokens
    assert [p.text for p in pieces if p.trained] == ["珠", "峰", "<|im_end|>"]
    assert [p.text for p in pieces if p.special] == ["<|im_start|>", "<|im_end|>"] * 3


def test_mask_ansi_plain_and_coloured(tok):
    sample = encode(MSGS, tok)
    assert mask_ansi(sample["input_ids"], sample["labels"], tok, color=False) == (
        "<|im_start|>system⏎\nS<|im_end|>⏎\n<|im_start|>user⏎\n峰?<|im_end|>⏎\n"
        "<|im_start|>assistant⏎\n⟦珠峰<|im_end|>⟧⏎\n")
    coloured = mask_ansi(sample["input_ids"], sample["labels"], tok)
    assert coloured.startswith(f"{ANSI_SPECIAL}<|im_start|>{ANSI_RESET}{ANSI_CONTEXT}system")
    assert coloured.endswith(f"{ANSI_TRAINED}珠{ANSI_RESET}{ANSI_TRAINED}峰{ANSI_RESET}"
                             f"{ANSI_TRAINED}<|im_end|>{ANSI_RESET}{ANSI_CONTEXT}⏎{ANSI_RESET}\n")


def test_mask_html_marks_every_token(tok):
    sample = encode(MSGS, tok)
    page = mask_html(sample["input_ids"], sample["labels"], tok)
    assert page.count("<span") == len(token_pieces(sample["input_ids"], sample["labels"],
                                                   tok)) + 3  # + the legend's three
    assert "&lt;|im_start|&gt;" in page and "⏎<br>" in page
    assert 'title="id 2 · label trained"' in page and 'title="id 1 · label -100"' in page


def test_text_histogram():
    assert text_histogram([]) == "(no values)"
    assert text_histogram([5, 5, 5], bins=4, width=3) == " 5 –  5 | ███ 3"
    assert text_histogram([10, 11, 19, 20], bins=2, width=2) == (
        " 10 –  15 | ██ 2\n 16 –  20 | ██ 2")
