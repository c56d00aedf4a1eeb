"""The tokenizer half of a GGUF file: tokens, types, merges, pre-tokenizer, special ids.

llama.cpp re-implements the tokenizer from what the file says, so every field matters:

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE; tokens are stored in their byte-level
  spelling (``Ġthe``), exactly as in tokenizer.json, with ``merges`` in rank order;
- token types: NORMAL, CONTROL (special added tokens such as ``<|im_end|>``: never
  produced from plain text), USER_DEFINED (other added tokens), UNUSED (ids the config
  reserves beyond the tokenizer, named ``[PAD{id}]``);
- ``tokenizer.ggml.pre``: how text is split before BPE. llama.cpp knows it by name
  ("gpt-2", "smollm", ...). It is taken from the GGUF a model came from when there is
  one (the bundled model: "smollm", digits split one by one), else recognised from the
  structure of tokenizer.json's pre_tokenizer (`pre_tokenizer_name`);
- bos/eos/unk/pad ids, whether BOS/EOS are added to every text (measured on the HF
  tokenizer itself), the end-of-turn id and the Jinja chat template.

Not handled: SentencePiece (``tokenizer.model``) or WordPiece vocabularies, and
pre-tokenizers outside `KNOWN_PRE` when the model did not come from a GGUF.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tutor.errors import TutorError
from tutor.models import BUNDLED, bundled_gguf_path
from tutor.runs import SOURCE_FILE, recorded

KNOWN_PRE = ("gpt-2", "smollm")


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, types) for ids 0..vocab_size-1 in byte-level spelling (see module doc)."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if len(by_id) > vocab_size:
        raise TutorError(f"the tokenizer has {len(by_id)} tokens but the model only "
                         f"{vocab_size} embeddings: tokenizer and model do not belong together")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TutorError(f"{model_dir} has no tokenizer.json: only byte-level BPE tokenizers "
                         "(tokenizer.json) can be exported, not SentencePiece models")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise TutorError(f"{path}: tokenizer model '{data.get('model', {}).get('type')}' is "
                         "not supported; supported: byte-level BPE (GGUF model 'gpt2')")
    return data


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name for tokenizer.json's pre_tokenizer, or None.

    ByteLevel (GPT-2 regex) alone → "gpt-2"; Digits(individual) then ByteLevel → "smollm".
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True)
    if byte_level and kinds == ["ByteLevel"]:
        return "gpt-2"
    if byte_level and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    return None


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF a model directory was converted from (directly or via its merge base)."""
    for folder in (model_dir, None):
        if folder is None:
            base = recorded(model_dir, "base_model")
            if base in BUNDLED:
                return bundled_gguf_path(base)
            if not base or not (Path(str(base)) / SOURCE_FILE).is_file():
                return None
            folder = Path(str(base))
        meta = folder / SOURCE_FILE
        if meta.is_file():
            gguf = json.loads(meta.read_text()).get("gguf")
            return Path(gguf) if gguf and Path(gguf).is_file() else None
    return None


def read_pre(gguf_path: Path) -> str | None:
    """``tokenizer.ggml.pre`` of an existing GGUF file, or None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def choose_pre(model_dir: Path, tokenizer_json: dict[str, Any]) -> str:
    """The pre-tokenizer to write: from the source GGUF, else from tokenizer.json."""
    source = source_gguf(model_dir)
    name = read_pre(source) if source is not None else None
    name = name or pre_tokenizer_name(tokenizer_json)
    if name is None:
        raise TutorError(f"{model_dir}/tokenizer.json: unrecognised pre_tokenizer; "
                         f"supported: {', '.join(KNOWN_PRE)} or a model converted from a GGUF")
    return name


def _single_token(tokenizer: Any, word: str) -> int | None:
    ids = tokenizer.encode(word, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def add_vocab(writer: Any, tokenizer: Any, model_dir: Path, config: Any,
              stop_words: Sequence[str]) -> str:
    """Write every tokenizer key of the module docstring; return the pre-tokenizer name."""
    import gguf

    data = _tokenizer_json(model_dir)
    tokens, types = token_list(tokenizer, config.vocab_size)
    pre = choose_pre(model_dir, data)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise TutorError(f"{model_dir}/tokenizer.json has no BPE merges")
    special.add_special_token = {}  # measured below on the tokenizer itself instead
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id
                             and len(probe) > 1)
    writer.add_add_space_prefix(False)  # byte-level BPE: spaces are part of the tokens
    eot = next((i for i in (_single_token(tokenizer, w) for w in stop_words) if i is not None),
               None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    return pre
