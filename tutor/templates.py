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
the dataclass fields below; `get_template("auto", tokenizer=tok)` wraps the
tokenizer's own Jinja (see `tutor.autotemplate`).

Not handled: tool calls, multimodal content, reasoning fields, and system messages
anywhere but first (few families define them). Tokenisation is not done here:
`tutor.data.encode` maps trainable characters to tokens.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tutor.errors import TutorError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
Message = Mapping[str, Any]  # {"role": "system"|"user"|"assistant", "content": str}


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


class ChatTemplate:
    """A chat format. Subclasses implement `segments`; `render` joins them."""

    name: str
    stop_words: tuple[str, ...]

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[Segment]:
        """The rendered conversation as a list of `Segment`s (see module docstring)."""
        raise NotImplementedError

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


def _chatml(name: str, source: str, default_system: str | None = None, bos: str = ""):
    """ChatML (``<|im_start|>role\\n ... <|im_end|>\\n``), shared by several families."""
    return FormatTemplate(
        name=name,
        system=Turn("<|im_start|>system\n", "<|im_end|>", "\n"),
        user=Turn("<|im_start|>user\n", "<|im_end|>", "\n"),
        assistant=Turn("<|im_start|>assistant\n", "<|im_end|>", "\n"),
        generation_prompt="<|im_start|>assistant\n",
        stop_words=("<|im_end|>",),
        bos=bos,
        default_system=default_system,
        source=source,
    )


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Each entry mirrors the official Jinja named in `source` (tests/fixtures/chat_templates/
# holds those strings and the tests render both). Whitespace here is significant.
TEMPLATES: dict[str, FormatTemplate] = {
    t.name: t
    for t in (
        _chatml("default", "transformers <= 4.42 default_chat_template (ChatML, no system)"),
        _chatml("chatml", "teknium/OpenHermes-2.5-Mistral-7B"),
        _chatml(
            "qwen_chat",
            "Qwen/Qwen2.5-7B-Instruct",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        ),
        _chatml("internlm2_chat", "internlm/internlm2-chat-7b", bos="<s>"),
        FormatTemplate(
            name="internlm_chat",
            system=Turn("<|System|>:", "\n"),
            user=Turn("<|User|>:", "<eoh>\n"),
            assistant=Turn("<|Bot|>:", "<eoa>", "\n"),
            generation_prompt="<|Bot|>:",
            stop_words=("<eoa>",),
            bos="<s>",
            source="internlm/internlm-chat-7b prompt builder (no Jinja shipped), as XTuner",
        ),
        FormatTemplate(
            name="llama2_chat",
            system=Turn("<<SYS>>\n", "\n<</SYS>>\n\n"),
            user=Turn("[INST] ", " [/INST]"),
            assistant=Turn(" ", " </s>"),
            generation_prompt="",  # the official template has no generation prompt
            stop_words=("</s>",),
            bos="<s>",
            bos_each_user_turn=True,
            system_mode="first_user",
            strip=True,
            alternate=True,
            source="meta-llama/Llama-2-7b-chat-hf",
        ),
        FormatTemplate(
            name="llama3_chat",
            system=Turn("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
            user=Turn("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
            assistant=Turn("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
            generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
            stop_words=("<|eot_id|>",),
            bos="<|begin_of_text|>",
            strip=True,
            source="meta-llama/Meta-Llama-3-8B-Instruct",
        ),
        FormatTemplate(
            name="mistral",
            system=Turn("", "\n\n"),
            user=Turn(" [INST] ", " [/INST]"),
            assistant=Turn(" ", "</s>"),
            generation_prompt="",  # the official template has no generation prompt
            stop_words=("</s>",),
            bos="<s>",
            system_mode="first_user",
            alternate=True,
            source="mistralai/Mistral-7B-Instruct-v0.1 (current revision, with system prompt)",
        ),
        FormatTemplate(
            name="zephyr",
            system=Turn("<|system|>\n", "</s>", "\n"),
            user=Turn("<|user|>\n", "</s>", "\n"),
            assistant=Turn("<|assistant|>\n", "</s>", "\n"),
            generation_prompt="<|assistant|>\n",
            stop_words=("</s>",),
            source="HuggingFaceH4/zephyr-7b-beta",
        ),
        FormatTemplate(
            name="gemma",
            system=Turn(""),  # unused: Gemma has no system role
            user=Turn("<start_of_turn>user\n", "<end_of_turn>", "\n"),
            assistant=Turn("<start_of_turn>model\n", "<end_of_turn>", "\n"),
            generation_prompt="<start_of_turn>model\n",
            stop_words=("<end_of_turn>",),
            bos="<bos>",
            system_mode="reject",
            strip=True,
            alternate=True,
            source="google/gemma-7b-it (same as gemma-2)",
        ),
        FormatTemplate(
            name="phi3_chat",
            system=Turn("<|system|>\n", "<|end|>", "\n"),
            user=Turn("<|user|>\n", "<|end|>", "\n"),
            assistant=Turn("<|assistant|>\n", "<|end|>", "\n"),
            generation_prompt="<|assistant|>\n",
            stop_words=("<|end|>",),
            end="<|endoftext|>",
            source="microsoft/Phi-3-mini-4k-instruct",
        ),
        FormatTemplate(
            name="deepseek_v2",
            system=Turn("", "\n\n"),
            user=Turn("User: ", "\n\n"),
            assistant=Turn("Assistant: ", "<｜end▁of▁sentence｜>"),
            generation_prompt="Assistant:",
            stop_words=("<｜end▁of▁sentence｜>",),
            bos="<｜begin▁of▁sentence｜>",
            source="deepseek-ai/DeepSeek-V2-Chat",
        ),
        FormatTemplate(
            name="vicuna",
            system=Turn("", " "),
            user=Turn("USER: ", " "),
            assistant=Turn("ASSISTANT: ", "</s>"),
            generation_prompt="ASSISTANT:",
            stop_words=("</s>",),
            default_system=_VICUNA_SYSTEM,
            source="lmsys/vicuna-7b-v1.5 via FastChat 'vicuna_v1.1' (no Jinja shipped)",
        ),
    )
}

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
        from tutor.autotemplate import JinjaTemplate

        return JinjaTemplate(tokenizer)
    if name in TEMPLATES:
        return TEMPLATES[name]
    close = difflib.get_close_matches(str(name), list_templates(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TutorError(f"unknown chat template '{name}'; {hint}known: {', '.join(list_templates())}")
