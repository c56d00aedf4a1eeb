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
the dataclass fields of `tutor.templates.base` (the families are listed in
`tutor.templates.families`);
`get_template("auto", tokenizer=tok)` wraps the tokenizer's own Jinja (see
`tutor.templates.tokenizer_template`).

Not handled: tool calls, multimodal content, reasoning fields, and system messages
anywhere but first (few families define them). Tokenisation is not done here:
`tutor.data.encode` maps trainable characters to tokens.
"""

from tutor.templates.base import ROLES, ChatTemplate, FormatTemplate, Segment, Turn, check_messages
from tutor.templates.families import TEMPLATES
from tutor.templates.lookup import AUTO, get_template, list_templates
from tutor.templates.tokenizer_template import JinjaTemplate

__all__ = ["AUTO", "ROLES", "TEMPLATES", "ChatTemplate", "FormatTemplate", "JinjaTemplate",
           "Segment", "Turn", "check_messages", "get_template", "list_templates"]
