"""Chat templates: how a list of messages becomes the one string a model reads.

Every chat model was trained on conversations written in one fixed format: role
headers, end-of-turn markers, maybe a BOS token and a default system prompt. The
format is usually hidden inside inference code (the Jinja `chat_template` of a
tokenizer); here it is plain data, so it can be printed, compared and tested.

A template gives two views of a conversation:

- `render(messages)`: the exact string, identical to the family's official Jinja;
- `segments(messages)`: the same string cut into `Segment`s, each flagged
  `trainable` or not. Trainable = an assistant turn's content plus its end-of-turn
  text (so the model learns to answer *and to stop*). Headers, separators, BOS,
  system/user text and any default system prompt are never trainable::

      <|im_start|>user⏎ Hi <|im_end|>⏎ <|im_start|>assistant⏎ Hello <|im_end|> ⏎
      ------------------------------- ---------------------- +++++ ++++++++++ -

  Invariant: ``"".join(s.text for s in template.segments(m)) == template.render(m)``.

Named templates (`get_template("chatml")`, ...) are `FormatTemplate`s, built from
the dataclass fields below (the families are listed in `tutor.template_families`);
`get_template("auto", tokenizer=tok)` wraps the tokenizer's own Jinja (see
`tutor.autotemplate`).

Not handled: tool calls, multimodal content, reasoning fields, and system messages
anywhere but first (few families define them). Tokenisation is not done here:
`tutor.data.encode` maps trainable characters to tokens.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from tutor.autotemplate import JinjaTemplate
from tutor.errors import TutorError
from tutor.template_base import (  # noqa: F401  (the public names of `tutor.templates`)
    ROLES,
    ChatTemplate,
    FormatTemplate,
    Segment,
    Turn,
    check_messages,
)
from tutor.template_families import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

AUTO = "auto"


def list_templates() -> list[str]:
    """Names `get_template` accepts, sorted, with "auto" first."""
    return [AUTO, *sorted(TEMPLATES)]


def get_template(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> ChatTemplate:
    """The template called `name`; "auto" wraps `tokenizer`'s own Jinja chat template.

    Unknown names raise `TutorError` suggesting the closest known names.
    """
    if name == AUTO:
        if tokenizer is None:
            raise TutorError("template 'auto' reads the tokenizer's chat_template: pass tokenizer=")
        return JinjaTemplate(tokenizer)
    if name in TEMPLATES:
        return TEMPLATES[name]
    close = difflib.get_close_matches(str(name), list_templates(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TutorError(f"unknown chat template '{name}'; {hint}known: {', '.join(list_templates())}")
