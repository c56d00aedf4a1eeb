"""The building blocks of a chat template: `Segment`, `Turn`, `ChatTemplate`, `FormatTemplate`.

`tutor.templates` explains what a template is and hands out the named ones; this module holds
the classes that `tutor.templates.families` (the named families, as data) and
`tutor.templates.tokenizer_template` (a tokenizer's own Jinja) are built from, so neither
needs the lookup by name (`tutor.templates.lookup`).

Not handled: tool calls, multimodal content, reasoning fields, system messages anywhere but
first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tutor.common import Message
from tutor.errors import TutorError

if TYPE_CHECKING:
    pass

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation.

    `role` is the role of the turn the text belongs to ("system", "user",
    "assistant"), or "template" for text outside any turn (BOS, a closing EOS).
    """

    text: str
    role: str
    trainable: bool


@dataclass(frozen=True)
class Turn:
    """How one role's message is written: ``prefix + content + suffix + sep``.

    For the assistant, `suffix` is the end-of-turn text (trained, e.g. "<|im_end|>")
    and `sep` the separator after it (not trained, e.g. "\\n").
    """

    prefix: str
    suffix: str = ""
    sep: str = ""


class ChatTemplate(ABC):
    """A chat format. Subclasses implement `segments`; `render` joins them.

    `stop_words` are the end-of-turn strings: generation stops when one appears.
    """

    name: str
    stop_words: tuple[str, ...]

    @abstractmethod
    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[Segment]:
        """The rendered conversation as a list of `Segment`s (see module docstring)."""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The exact prompt string. `add_generation_prompt` appends the assistant header."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))


SystemMode = Literal["turn", "first_user", "reject"]


@dataclass(frozen=True)
class FormatTemplate(ChatTemplate):
    """A named chat format described as data.

    system_mode: "turn" writes the system message as its own turn; "first_user" puts
    ``system.prefix + system + system.suffix`` inside the first user turn (Llama 2's
    ``<<SYS>>``); "reject" means the family has no system role (a system message is
    an error). `default_system` is used when the conversation has no system message.
    `strip` applies ``str.strip()`` to every content, as some official templates do.
    `alternate` enforces user/assistant/user/... after the optional system message.
    `end` is appended after the last turn when no generation prompt is asked for.
    `bos_each_user_turn` writes `bos` before every user turn instead of once.
    """

    name: str
    user: Turn
    assistant: Turn
    system: Turn
    generation_prompt: str
    stop_words: tuple[str, ...]
    bos: str = ""
    bos_each_user_turn: bool = False
    default_system: str | None = None
    system_mode: SystemMode = "turn"
    strip: bool = False
    alternate: bool = False
    end: str = ""
    source: str = ""  # where the official format comes from (model repo / file)

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[Segment]:
        msgs = check_messages(messages, system_first=True)
        system = self.default_system
        if msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
            if self.system_mode == "reject":
                raise TutorError(
                    f"template '{self.name}' has no system role (as in its official template); "
                    "put the instructions into the first user message instead"
                )
        if self.alternate:
            self._check_alternation(msgs)
        out: list[Segment] = []
        add = out.append
        if self.bos and not self.bos_each_user_turn:
            add(Segment(self.bos, "template", False))
        if system is not None and self.system_mode == "turn":
            self._add_turn(out, "system", system, self.system)
            system = None
        for message in msgs:
            role, content = message["role"], message["content"]
            turn = self.user if role == "user" else self.assistant
            if role == "user" and self.bos_each_user_turn:
                add(Segment(self.bos, "template", False))
            if role == "user" and system is not None and self.system_mode == "first_user":
                self._add_user_with_system(out, system, content)
                system = None
            else:
                self._add_turn(out, role, content, turn)
        if add_generation_prompt:
            add(Segment(self.generation_prompt, "assistant", False))
        elif self.end:
            add(Segment(self.end, "template", False))
        return [s for s in out if s.text]

    def _add_turn(self, out: list[Segment], role: str, content: str, turn: Turn) -> None:
        trained = role == "assistant"
        out.append(Segment(turn.prefix, role, False))
        out.append(Segment(content.strip() if self.strip else content, role, trained))
        out.append(Segment(turn.suffix, role, trained))
        out.append(Segment(turn.sep, role, False))

    def _add_user_with_system(self, out: list[Segment], system: str, content: str) -> None:
        """Llama 2 style: the system block is part of the first user message's text.

        Official templates strip the *combined* text, so we strip it whole and then cut
        it where the system block ends (only whitespace-only user text moves the cut).
        """
        wrapped = self.system.prefix + system + self.system.suffix
        combined = wrapped + content
        text = combined.strip() if self.strip else combined
        lead = len(combined) - len(combined.lstrip()) if self.strip else 0
        cut = min(max(len(wrapped) - lead, 0), len(text))
        out.append(Segment(self.user.prefix, "user", False))
        out.append(Segment(text[:cut], "system", False))
        out.append(Segment(text[cut:], "user", False))
        out.append(Segment(self.user.suffix + self.user.sep, "user", False))

    def _check_alternation(self, msgs: Sequence[Message]) -> None:
        for i, message in enumerate(msgs):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise TutorError(
                    f"template '{self.name}' needs roles to alternate user/assistant/user/... "
                    f"(after an optional system message), but turn {i} is '{message['role']}'"
                )


def check_messages(messages: Sequence[Message], system_first: bool = False) -> list[Message]:
    """Validate a conversation; return it as a list. Raises `TutorError` naming the message.

    Checks: a non-empty list of mappings, each with a known `role` and a string
    `content`; with `system_first`, a system message may only come first.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TutorError(
            "a conversation must be a list of {'role': ..., 'content': ...} messages, "
            f"not {type(messages).__name__}"
        )
    if not messages:
        raise TutorError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TutorError(f"message {i} must be a mapping with role/content, not {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise TutorError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise TutorError(f"message {i} ({role}): 'content' must be a string")
        if system_first and role == "system" and i > 0:
            raise TutorError(f"message {i}: a system message is only allowed first")
    return list(messages)
