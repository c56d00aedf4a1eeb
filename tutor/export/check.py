"""Check an exported GGUF against the model it came from, offline, with transformers.

transformers reads GGUF (``from_pretrained(dir, gguf_file=name)``: it dequantises every
tensor and undoes the rotary row order), so the round trip source → GGUF → HF can be
compared with the source on fixed prompts (the demo's questions in the model's chat
template, plus one plain sentence):

- the reloaded tokenizer must give the same token ids (vocab, merges, specials intact);
- max |logit difference| over every position must stay within `TOLERANCE[type]`;
- next-token agreement: the share of positions whose argmax token is the same must
  reach `MIN_AGREEMENT[type]`;
- at f16/bf16 the greedy answers must be equal token for token for the first
  `GREEDY_TOKENS` tokens (reported, not required, for q8_0/q4_0).

Tolerances: measured by bench/export_check.py on SmolLM2-135M-Instruct (bundled),
fp32 compute, transformers 5.24, gguf 0.19, AVX2 EPYC
(bench/results/export_check.md), then set above the measurement with a margin:

    type  MiB    max |logit diff|  agreement  greedy equal  →  TOLERANCE  MIN_AGREEMENT
    f16   258.3  0.041             1.000      16, 16, 16       0.1        0.98
    bf16  258.3  0.276             1.000      16, 16, 16       0.6        0.97
    q8_0  138.1  1.32              0.968      16, 16, 16       2.5        0.92
    q4_0  101.7  12.7              0.768      0, 6, 4          25         0.65

A quantised file is *meant* to differ: the bounds catch gross breakage (a wrong tensor
order or tokenizer), not rounding. q4_0's are wide because 4 bits on a 135M model change
the greedy answers within a few tokens (the bundled model's q4_0 still answers "What is
the capital of France?" with Paris); prefer q8_0 for small models.
Not handled: comparing through llama.cpp itself (see tests/test_export.py, which does
when llama-cpp-python is installed).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tutor.errors import TutorError
from tutor.offline import no_progress_bars

TOLERANCE = {"f16": 0.1, "bf16": 0.6, "q8_0": 2.5, "q4_0": 25.0}
MIN_AGREEMENT = {"f16": 0.98, "bf16": 0.97, "q8_0": 0.92, "q4_0": 0.65}
GREEDY_TOKENS = 16  # leading greedy tokens that must match at f16/bf16
EXACT_GREEDY = ("f16", "bf16")
PLAIN_TEXT = "Low-rank adapters add a small update to each weight matrix."


@dataclass
class CheckReport:
    """Outcome of `check_export` (all numbers over every position of every prompt)."""

    type: str
    max_abs_diff: float
    agreement: float
    greedy_match: list[int] = field(default_factory=list)  # leading equal tokens per question
    positions: int = 0

    @property
    def passed(self) -> bool:
        greedy_ok = (self.type not in EXACT_GREEDY
                     or all(n >= GREEDY_TOKENS for n in self.greedy_match))
        return (self.max_abs_diff <= TOLERANCE[self.type]
                and self.agreement >= MIN_AGREEMENT[self.type] and greedy_ok)

    def summary(self) -> str:
        greedy = ", ".join(str(n) for n in self.greedy_match)
        return (f"check vs. source ({self.positions} positions): max |logit diff| "
                f"{self.max_abs_diff:.3g} (<= {TOLERANCE[self.type]}), next-token agreement "
                f"{self.agreement:.3f} (>= {MIN_AGREEMENT[self.type]}); greedy answers equal "
                f"for the first [{greedy}] of {GREEDY_TOKENS} tokens")


# The questions of `tutor demo --quick`: the taught identity and two general ones. The
# tolerances above were measured on them.
QUESTIONS = ("Who are you?", "What is the capital of France?",
             "Give me one tip for learning a new language.")


def probe_prompts(template: Any) -> list[str]:
    """`QUESTIONS` rendered with `template` (generation prompt added) + plain text."""
    return [template.render([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in QUESTIONS] + [PLAIN_TEXT]


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf-py, transformers and llama.cpp read


def check_gguf(path: str | Path) -> None:
    """One line naming `path` unless it is a whole GGUF file, checked before transformers or
    llama.cpp read it (they fail with a traceback or a temp path): the magic and version,
    a tensor table gguf-py can parse, and the last tensor's data ending inside the file.

    Not checked: the tensor values themselves (a file damaged in place but whole in size).
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise TutorError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise TutorError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not "
                         f"{GGUF_MAGIC!r}); pass a file written by `tutor export` or llama.cpp")
    version, size = int.from_bytes(head[4:8], "little"), path.stat().st_size
    if version not in GGUF_VERSIONS:
        raise TutorError(f"{path}: GGUF version {version} is not one of "
                         f"{', '.join(map(str, GGUF_VERSIONS))}")
    damaged = f"{path}: damaged GGUF file"
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:  # numpy's reshape/bounds
        raise TutorError(f"{damaged} (its tensor table and data do not fit in its {size} "
                         "bytes): truncated? export or copy it again") from exc
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise TutorError(f"{damaged} (its tensors end at byte {end}, the file has {size}): "
                         "truncated; export or copy it again")


@contextlib.contextmanager
def _alone(path: Path) -> Iterator[Path]:
    """A temp directory holding only a link to GGUF `path` (checked by `check_gguf`).

    transformers reads a tokenizer_config.json or config.json lying beside the GGUF (an
    export written into a model directory) and then loses the file's own special tokens
    and chat template; alone in a directory, the GGUF is all it reads.
    """
    check_gguf(path)
    with tempfile.TemporaryDirectory(prefix=".tutor-gguf-") as tmp:
        link = Path(tmp) / path.name
        os.symlink(path.resolve(), link)
        yield link


def gguf_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer stored in a GGUF file (tokens, merges, specials, chat template)."""
    from transformers import AutoTokenizer

    with _alone(Path(path)) as link:
        tokenizer = AutoTokenizer.from_pretrained(link.parent, gguf_file=link.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_gguf(path: str | Path) -> tuple[Any, Any]:
    """(model fp32 eval, tokenizer) from a GGUF file via transformers (dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = gguf_tokenizer(path)
    with _alone(Path(path)) as link, no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(link.parent, gguf_file=link.name,
                                                     dtype=torch.float32)
    return model.eval(), tokenizer


def greedy_ids(model: Any, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` (no stop: the comparison wants exactly n)."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many leading elements of `a` and `b` are equal."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(source: Any, tokenizer: Any, reloaded: Any, reloaded_tok: Any, kind: str,
            prompts: list[str], n_greedy: int = GREEDY_TOKENS) -> CheckReport:
    """Logit difference, argmax agreement and greedy prefix match on `prompts`."""
    import torch

    diffs, same, total, greedy = [], 0, 0, []
    for text in prompts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if reloaded_tok.encode(text, add_special_tokens=False) != ids:
            raise TutorError(f"the GGUF's tokenizer splits {text[:40]!r} differently from the "
                             "source tokenizer: the vocabulary was not exported intact")
        with torch.inference_mode():
            a = source(torch.tensor([ids])).logits[0].float()  # (T, V)
            b = reloaded(torch.tensor([ids])).logits[0].float()
        diffs.append(float((a - b).abs().max()))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        if text != PLAIN_TEXT:
            greedy.append(leading_equal(greedy_ids(source, ids, n_greedy),
                                        greedy_ids(reloaded, ids, n_greedy)))
    return CheckReport(kind, max(diffs), same / total, greedy, total)


def check_export(source: Any, tokenizer: Any, path: str | Path, kind: str,
                 template: Any) -> CheckReport:
    """Reload `path` with transformers and compare it with `source`; raise if it fails."""
    reloaded, reloaded_tok = load_gguf(path)
    report = compare(source, tokenizer, reloaded, reloaded_tok, kind, probe_prompts(template))
    if not report.passed:
        raise TutorError(f"{path} failed its check and was removed: {report.summary()}")
    return report
