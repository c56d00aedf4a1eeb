"""An Ollama `Modelfile` for an exported GGUF: the chat template in Go-template syntax.

Ollama does not run the Jinja template stored in the GGUF; it formats chats with the
Modelfile's TEMPLATE, written in Go's text/template language, and stops at each
``PARAMETER stop``. A model whose template or stop word is lost never stops talking
(the most reported breakage of GGUF exports), so the TEMPLATE here is derived from the
`tutor.templates` template the model was trained with, and a test renders it (with the
small Go-template renderer in tests/gotemplate.py) byte for byte against that template.

How the template is derived (`turn_layout`): render a probe conversation whose contents
are sentinels and cut the text between them. That gives, per role, the text that opens
a turn and the text that closes it, the generation prompt and a default system prompt
(injected by the Jinja when the chat has none; Ollama injects the Modelfile's SYSTEM
instead). The layout is then checked against the template on probe conversations
(several turns, with and without a system message, contents with surrounding spaces);
a template that does not fit "open + content + close" per message is refused.

Ollama semantics the TEMPLATE follows: ``.System`` is the system prompt (the request's,
else SYSTEM), ``.Messages`` holds the user/assistant turns; a last assistant message is
a prefill the model continues, so it is left open (no end-of-turn).

Not handled: templates that strip or rewrite contents, put the system prompt inside the
first user turn (Llama 2), or differ by turn position; tools and images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor.common import atomic_write
from tutor.errors import TutorError

MODELFILE = "Modelfile"
_S = "\ue000S\ue000"  # sentinels: private-use characters never found in chat data
_U = ("\ue000U0\ue000", "\ue000U1\ue000")
_A = ("\ue000A0\ue000", "\ue000A1\ue000")


@dataclass(frozen=True)
class TurnLayout:
    """A chat template as: ``start`` + per message ``open[role] + content + close[role]``
    + (``generation`` after a final user message). `default_system` or None."""

    start: str
    open: dict[str, str]
    close: dict[str, str]
    generation: str
    default_system: str | None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The layout's own rendering (used to check it against the template)."""
        msgs = list(messages)
        if self.default_system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.default_system}, *msgs]
        text = self.start + "".join(self.open[m["role"]] + m["content"] + self.close[m["role"]]
                                    for m in msgs)
        return text + (self.generation if add_generation_prompt else "")


def _cut(text: str, marks: list[str]) -> list[str]:
    """`text` split at each of `marks` in order: len(marks) + 1 pieces."""
    pieces = []
    for mark in marks:
        head, found, text = text.partition(mark)
        if not found:
            raise TutorError("the chat template does not write every message's content as is; "
                             "it cannot be expressed as an Ollama TEMPLATE")
        pieces.append(head)
    return [*pieces, text]


def turn_layout(template: Any) -> TurnLayout:
    """Derive the `TurnLayout` of `template` (a `tutor.templates.ChatTemplate`); see doc."""
    conv = [{"role": "system", "content": _S}, {"role": "user", "content": _U[0]},
            {"role": "assistant", "content": _A[0]}, {"role": "user", "content": _U[1]},
            {"role": "assistant", "content": _A[1]}]
    full = _cut(template.render(conv), [_S, _U[0], _A[0], _U[1], _A[1]])
    start_sys, sys_user, user_asst, asst_user, _, end = full
    close_asst = end
    if not asst_user.startswith(close_asst):
        raise TutorError("the chat template closes assistant turns differently in the middle "
                         "of a chat and at its end; not expressible as an Ollama TEMPLATE")
    open_user = asst_user[len(close_asst):]
    close_user = _common_prefix_close(user_asst, template)
    open_asst = user_asst[len(close_user):]
    if not sys_user.endswith(open_user):
        raise TutorError("the chat template opens the first user turn differently; "
                         "not expressible as an Ollama TEMPLATE")
    close_sys = sys_user[: len(sys_user) - len(open_user)]
    gen = _cut(template.render(conv[:2], add_generation_prompt=True), [_S, _U[0]])[-1]
    generation = gen[len(close_user):]
    start, open_sys = _split_start(start_sys, template, open_user)
    layout = TurnLayout(start, {"system": open_sys, "user": open_user, "assistant": open_asst},
                        {"system": close_sys, "user": close_user, "assistant": close_asst},
                        generation, _default_system(template, start + open_sys, close_sys,
                                                    open_user))
    _check(layout, template)
    return layout


def _common_prefix_close(user_asst: str, template: Any) -> str:
    """The user turn's closing text: the gap before the generation prompt after a user turn.

    The text between a user's content and the assistant's is ``close_user + open_asst``;
    rendering a chat that ends on a user turn *without* generation prompt shows where
    ``close_user`` ends.
    """
    alone = _cut(template.render([{"role": "user", "content": _U[0]}]), [_U[0]])[-1]
    if not user_asst.startswith(alone):
        raise TutorError("the chat template ends a final user turn differently; "
                         "not expressible as an Ollama TEMPLATE")
    return alone


def _split_start(start_sys: str, template: Any, open_user: str) -> tuple[str, str]:
    """Split the text before the system content into (start of chat, open of system)."""
    no_sys = _cut(template.render([{"role": "user", "content": _U[0]}]), [_U[0]])[0]
    # Without a system message the chat begins start + [default system turn] + open_user;
    # with no default it is exactly start + open_user.
    if no_sys.endswith(open_user) and start_sys.startswith(no_sys[: -len(open_user) or None]):
        start = no_sys[: len(no_sys) - len(open_user)]
        if start_sys.startswith(start) and len(start) < len(start_sys):
            return start, start_sys[len(start):]
    return "", start_sys


def _default_system(template: Any, before: str, close_sys: str, open_user: str) -> str | None:
    """The system text the template injects when the chat has none (None if it does not)."""
    head = _cut(template.render([{"role": "user", "content": _U[0]}]), [_U[0]])[0]
    if head.startswith(before) and head.endswith(close_sys + open_user):
        return head[len(before): len(head) - len(close_sys + open_user)]
    return None


def _check(layout: TurnLayout, template: Any) -> None:
    """Refuse a layout that does not reproduce `template` on probe conversations."""
    for conv in probe_conversations():
        if layout.render(conv, True) != template.render(conv, add_generation_prompt=True):
            raise TutorError(f"the chat template '{template.name}' does not fit open + content "
                             "+ close per message; not expressible as an Ollama TEMPLATE")


def probe_conversations() -> list[list[dict[str, str]]]:
    """Conversations ending on a user turn: one turn, several, with/without system."""
    u1, a1 = {"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello!"}
    u2 = {"role": "user", "content": "Who are you?\nTell me."}
    sys = {"role": "system", "content": "You are Pico."}
    return [[u1], [sys, u1], [u1, a1, u2], [sys, u1, a1, u2, a1, u2]]


def _go(text: str) -> str:
    """`text` as Go-template literal text (a `{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(layout: TurnLayout) -> str:
    """The Ollama TEMPLATE (Go text/template) for `layout`, `.Messages` range form.

    A ``{{-`` (trim the whitespace before) only ever follows a newline put there for
    readability after another action, never the template's own text: ``<|im_end|>\\n``
    must keep its newline.
    """
    o, c = layout.open, layout.close
    return (
        f"{_go(layout.start)}{{{{ if .System }}}}{_go(o['system'])}{{{{ .System }}}}"
        f"{_go(c['system'])}{{{{ end }}}}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f"{{{{- if eq .Role \"user\" }}}}{_go(o['user'])}{{{{ .Content }}}}{_go(c['user'])}"
        f"{{{{ if $last }}}}{_go(layout.generation)}{{{{ end }}}}\n"
        f"{{{{- else if eq .Role \"assistant\" }}}}{_go(o['assistant'])}{{{{ .Content }}}}"
        f"{{{{ if not $last }}}}{_go(c['assistant'])}{{{{ end }}}}\n"
        "{{- end }}\n"
        "{{- end }}"
    )


def _quoted(text: str) -> str:
    """A Modelfile argument in triple quotes (the form that may span lines)."""
    if '"""' in text:
        raise TutorError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: Any, system: str | None = None) -> str:
    """The Modelfile for GGUF `gguf_name` (relative, so file and Modelfile move together).
    SYSTEM: `system` (the recipe's), else the template's default system prompt, if any."""
    layout = turn_layout(template)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(layout))}"]
    system = system if system is not None else layout.default_system
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{w}"' for w in template.stop_words]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, template: Any, system: str | None = None) -> Path:
    """Write `Modelfile` beside `gguf_path` (atomically); return its path."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / MODELFILE
    atomic_write(out, modelfile_text(gguf_path.name, template, system))
    return out
