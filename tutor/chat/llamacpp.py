"""Chat through llama.cpp (`llama-cpp-python`, the optional extra ``tutor[llamacpp]``).

A GGUF file runs in llama.cpp's own CPU kernels (quantised matmuls, no dequantising per
token), which is where an exported model is fast on a laptop. This module is a decoding
backend for `tutor.chat.session.ChatSession`: the session, its template (the same
`tutor.templates` template, rendered in Python), history, trimming, `/reset`,
streaming and stop words are unchanged; only the token loop runs in llama.cpp.

- prompts are tokenised by llama.cpp's tokenizer (the one stored in the file, with its
  pre-tokenizer), parsing special tokens such as ``<|im_start|>``;
- greedy when temperature is 0 (llama.cpp's greedy sampler), else temperature + top-p;
- stops at EOS, at single-token stop words (by id) and at text stop words (by text).

Not handled: prompt-lookup decoding (ignored), GPU offload (CPU build), a KV cache kept
between turns (each turn evaluates the prompt again, as the transformers path does).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tutor.chat.session import (
    ChatSession,
    Generation,
    GenerationSettings,
    StopWordFilter,
    TextCallback,
)
from tutor.errors import TutorError
from tutor.export.check import check_gguf, gguf_tokenizer
from tutor.templates import get_template

INSTALL = "pip install 'tutor[llamacpp]'  (llama-cpp-python, compiles for a few minutes)"


def available() -> bool:
    """Is llama-cpp-python installed?"""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def open_llama(path: str | Path, n_ctx: int = 4096, threads: int | None = None) -> Any:
    """A `llama_cpp.Llama` for GGUF `path` (CPU, quiet)."""
    check_gguf(path)  # llama.cpp's own failure names no file and no cause
    if not available():
        raise TutorError(f"chatting through llama.cpp needs llama-cpp-python: {INSTALL}")
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                 verbose=False)


class LlamaCppTokenizer:
    """The slice of a HF tokenizer that `ChatSession` uses, backed by llama.cpp's."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.model_max_length = llm.n_ctx()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens,
                                 special=True)


def stop_ids(llm: Any, stop_words: Sequence[str]) -> set[int]:
    """EOS plus every stop word that is one token in llama.cpp's vocabulary."""
    ids = {llm.token_eos()}
    for word in stop_words:
        tok = llm.tokenize(word.encode("utf-8"), add_bos=False, special=True)
        if len(tok) == 1:
            ids.add(tok[0])
    return ids


def generate(llm: Any, tokenizer: Any, prompt_ids: list[int],
             settings: GenerationSettings | None = None, stop_words: Sequence[str] = (),
             on_text: TextCallback | None = None) -> Generation:
    """Continue `prompt_ids` in llama.cpp until a stop; same contract as `tutor.chat.generate`."""
    settings = settings or GenerationSettings()
    settings.generate_kwargs()  # validates the numbers
    stops, filt = stop_ids(llm, stop_words), StopWordFilter(stop_words, on_text)
    llm.reset()
    sample = ({"temp": settings.temperature, "top_p": settings.top_p}
              if settings.temperature > 0 else {"temp": 0.0, "top_k": 1})
    new: list[int] = []
    raw, shown, stopped_by = b"", "", "length"
    start = time.perf_counter()
    for tok in llm.generate(prompt_ids, reset=True, repeat_penalty=settings.repetition_penalty,
                            **sample):
        if tok in stops:
            new.append(tok)
            stopped_by = "eos"
            break
        new.append(tok)
        raw += llm.detokenize([tok], special=False)
        text = raw.decode("utf-8", errors="ignore")  # an unfinished UTF-8 char waits
        filt.feed(text[len(shown):])
        shown = text
        if filt.stopped:
            stopped_by = "stop word"
            break
        if len(new) >= settings.max_new_tokens:
            break
    filt.feed("", final=True)
    seconds = time.perf_counter() - start
    return Generation(filt.text.strip(), len(new), len(prompt_ids), seconds, stopped_by)


def gguf_session(path: str | Path, template: str = "auto", system: str | None = None,
                 settings: GenerationSettings | None = None, n_ctx: int = 4096) -> Any:
    """A `ChatSession` over GGUF `path` decoding in llama.cpp.

    The chat template is read from the same file by transformers (``template="auto"``:
    the Jinja stored in the GGUF), so both backends format a conversation identically.
    """
    llm = open_llama(path, n_ctx)
    if template == "auto":
        chat_template = get_template("auto", tokenizer=gguf_tokenizer(path))
    else:
        chat_template = get_template(template)
    return ChatSession(llm, LlamaCppTokenizer(llm), template=chat_template, system=system,
                       settings=settings or GenerationSettings(), context_window=llm.n_ctx(),
                       decoder=generate)
