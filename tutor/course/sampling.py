"""Sampling measured on answers: how temperature, top-p and a repetition penalty change what
a model says (notebook 08 and its exercise 08.2).

`sample_answers` asks one question once per seed with `tutor.chat.generate` (the decoder of
`tutor chat`, so the settings are `tutor chat --temperature/--top-p/--repetition-penalty`);
`spread` summarises the answers: how many differ, their mean length in words, and how many
word 3-grams repeat inside an answer (the loops a repetition penalty is meant to break).

Not handled: comparing across machines (a seed fixes the draws on one machine and one torch
build only) or judging whether an answer is right (tutor.eval does keyword hits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tutor.chat import GenerationSettings, generate
from tutor.data import with_system
from tutor.templates import get_template


def sample_answers(model: Any, tokenizer: Any, question: str, settings: GenerationSettings,
                   seeds: Sequence[int], template: str = "auto",
                   system: str | None = None) -> list[str]:
    """One answer to `question` per seed (``torch.manual_seed(seed)`` before each)."""
    import torch

    chat = get_template(template, tokenizer=tokenizer)
    prompt = chat.render(with_system([{"role": "user", "content": question}], system),
                         add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    answers = []
    for seed in seeds:
        torch.manual_seed(seed)
        answers.append(generate(model, tokenizer, ids, settings, chat.stop_words).text)
    return answers


def repeated_ngrams(text: str, n: int = 3) -> int:
    """Word n-grams of `text` that occur again after their first time (0 = no loop)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams))


@dataclass(frozen=True)
class Spread:
    """What a set of sampled answers looks like."""

    distinct: int  # different answers among them
    mean_words: float  # mean answer length in words
    repeats: int  # repeated word 3-grams, summed over the answers


def spread(answers: Sequence[str]) -> Spread:
    return Spread(len(set(answers)), sum(len(a.split()) for a in answers) / len(answers),
                  sum(repeated_ngrams(a) for a in answers))
