"""A chat box for notebooks on top of `ChatSession`: text box, send button, history view.

With live widgets (Jupyter with ipywidgets) answers stream into the history view.
Where widgets cannot render (a plain terminal, nbval, a static notebook viewer) the
same object is still useful: `widget.send("...")` answers like a function call,
and its `transcript()` shows the conversation as text.

Not handled: rich formatting of answers (markdown is shown as plain text), several
sessions in one widget.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tutor.chat import ChatSession


class ChatWidget:
    """`ChatWidget(session)`; display it in a notebook, or call `.send(text)` anywhere."""

    def __init__(self, session: ChatSession) -> None:
        import ipywidgets as w

        self.session = session
        self.history = w.HTML(layout=w.Layout(max_height="300px", overflow_y="auto"))
        self.text = w.Text(placeholder="Ask something, press Enter", layout=w.Layout(flex="1"))
        self.button = w.Button(description="Send", button_style="primary")
        self.reset_button = w.Button(description="Reset")
        self.button.on_click(lambda _: self._submit())
        self.text.continuous_update = False
        self.text.observe(lambda change: self._submit(), names="value")
        self.reset_button.on_click(lambda _: self.reset())
        self.box = w.VBox([self.history, w.HBox([self.text, self.button, self.reset_button])])
        self._render()

    def send(self, text: str) -> str:
        """Answer `text` (streaming into the history view) and return the answer."""
        streamed = ""

        def on_text(piece: str) -> None:
            nonlocal streamed
            streamed += piece
            self._render(pending=(text, streamed))

        self._render(pending=(text, ""))
        answer = self.session.send(text, on_text=on_text)
        self._render()
        return answer

    def reset(self) -> None:
        self.session.reset()
        self._render()

    def transcript(self) -> str:
        """The conversation as plain text, one 'role: content' line per message."""
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.session.messages())

    def _submit(self) -> None:
        text = self.text.value.strip()
        if text:
            self.text.value = ""  # clearing re-fires `observe` with "", which is ignored
            self.send(text)

    def _render(self, pending: tuple[str, str] | None = None) -> None:
        msgs = self.session.messages()
        if pending is not None:
            msgs += [{"role": "user", "content": pending[0]},
                     {"role": "assistant", "content": pending[1] + " ▌"}]
        self.history.value = "".join(
            f"<p><b>{m['role']}</b>: {html.escape(m['content'])}</p>" for m in msgs
        ) or "<p><i>no messages yet</i></p>"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # Live frontends render the widget; everyone else gets the text transcript.
        bundle = self.box._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = self.transcript() or "(empty chat)"
        return bundle
