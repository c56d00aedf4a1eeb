"""The smallest real model for lessons and tests: a random Llama with the bundled tokenizer.

`tiny_llama` exercises the whole machinery (training, ZeRO ranks, convert, merge) in seconds;
it learns nothing useful. Notebook 09 trains it on two CPU ranks.

Not handled: other architectures; its weights are random, so its answers are noise.
"""

from __future__ import annotations

import os
from pathlib import Path

from tutor.models import ensure_bundled
from tutor.offline import no_progress_bars


def tiny_llama(path: str | os.PathLike[str], hidden: int = 64, layers: int = 2,
               seed: int = 0) -> Path:
    """A random Llama (`layers` blocks of width `hidden`, tied embeddings) with the bundled
    tokenizer (ChatML), saved to `path` as an ordinary Hugging Face checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ensure_bundled())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, tie_word_embeddings=True)
    with no_progress_bars():  # "Writing model shards" for one small file is noise
        LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
