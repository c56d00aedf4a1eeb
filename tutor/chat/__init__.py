"""Chat: talking to a model, from a notebook, the terminal or llama.cpp.

- `tutor.chat.session`: `ChatSession` (history, template, trimming, stop words, streaming)
  and the one-shot helpers `reply`, `reply_batch`, `ask`;
- `tutor.chat.load`: `open_session`, the one way chat, eval, the export check and the demo
  open a model (+ adapter, or a GGUF file) with the template and system prompt it was
  trained with;
- `tutor.chat.llamacpp`: a decoding backend that runs a GGUF file in llama.cpp;
- `tutor.chat.repl`: the terminal loop of `tutor chat`.
"""

from tutor.chat.load import open_session, pick_system, pick_template
from tutor.chat.session import (
    ChatSession,
    Generation,
    GenerationSettings,
    StopWordFilter,
    TextCallback,
    ask,
    context_window,
    generate,
    reply,
    reply_batch,
    stop_token_ids,
)

__all__ = ["ChatSession", "Generation", "GenerationSettings", "StopWordFilter", "TextCallback",
           "ask", "context_window", "generate", "open_session", "pick_system", "pick_template",
           "reply", "reply_batch", "stop_token_ids"]
