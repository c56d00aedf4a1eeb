"""Chat templates by name: `get_template("chatml")`, `get_template("auto", tokenizer=tok)`.

Named templates are the `FormatTemplate`s of `tutor.templates.families`; "auto" wraps the
tokenizer's own Jinja (`tutor.templates.tokenizer_template`). Not handled: templates
registered at run time (the list is the families' dict, read as data).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from tutor.errors import TutorError
from tutor.templates.base import ChatTemplate
from tutor.templates.families import TEMPLATES
from tutor.templates.tokenizer_template import JinjaTemplate

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
