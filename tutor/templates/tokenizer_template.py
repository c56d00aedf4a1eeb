"""Template "auto": a tokenizer's own Jinja chat template, cut into trainable segments.

`render` is exactly ``tokenizer.apply_chat_template(messages, tokenize=False)``. The
Jinja itself says nothing about which characters are the answer, so `segments`
finds out by rendering twice and comparing:

1. Render the conversation with every assistant content replaced by a unique
   sentinel (``\\ue000TUTOR_ANSWER_0\\ue000`` ...). The text between sentinels is template
   scaffolding, wherever the template put it (default system prompts, BOS, ...).
2. Match the real rendering against that skeleton; each answer appears either as
   written or stripped (some templates ``| trim`` the content) — that is its span.
3. The end-of-turn text is what follows an answer up to and including the first
   special token (``<|im_end|>``, ``</s>``, ``<|eot_id|>`` ...) before the next turn
   starts. Turn starts come from rendering growing prefixes of the conversation
   (``messages[:k]``) and taking the common prefix with the full rendering.

Not handled: templates that rewrite answers beyond stripping whitespace, or that
branch on the answer text (both are detected and raise `TutorError`); a template
with no special token after the answer yields no end-of-turn text. Role labels of
untrained text are by turn: an injected default system prompt is labelled with the
first message's role, since the Jinja does not say where it ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tutor.common import Message
from tutor.errors import TutorError
from tutor.templates.base import ChatTemplate, Segment, check_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _sentinel(i: int) -> str:
    # Private-use characters: never whitespace (survive `| trim`), never in real chat data.
    return f"\ue000TUTOR_ANSWER_{i}\ue000"


class JinjaTemplate(ChatTemplate):
    """`ChatTemplate` over ``tokenizer.chat_template`` (the "auto" template)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TutorError(
                "this tokenizer has no chat_template, so 'auto' cannot be used; "
                "pick a named template (tutor.templates.list_templates())"
            )
        self.name = "auto"
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        specials = set(tokenizer.all_special_tokens) | {t.content for t in added if t.special}
        self.special_tokens = tuple(sorted((s for s in specials if s), key=len, reverse=True))
        self.stop_words = self._probe_stop_words()

    def __repr__(self) -> str:
        return f"JinjaTemplate({os.path.basename(str(self.tokenizer.name_or_path))!r})"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self._jinja(check_messages(messages), add_generation_prompt)

    def segments(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[Segment]:
        msgs = check_messages(messages)
        real = self._jinja(msgs, add_generation_prompt)
        starts = self._turn_starts(msgs, real, add_generation_prompt)  # len(msgs) + 1 positions
        trained = self._trained_spans(msgs, real, add_generation_prompt, starts)
        cuts = sorted({0, len(real), *starts, *(p for span in trained for p in span)})
        out = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            turn = max(k for k, s in enumerate(starts) if s <= a)
            role = msgs[turn]["role"] if turn < len(msgs) else "assistant"  # generation prompt
            out.append(Segment(real[a:b], role, any(s <= a < e for s, _, e in trained)))
        return out

    def _trained_spans(
        self, msgs: list[Message], real: str, add_generation_prompt: bool, starts: list[int]
    ) -> list[tuple[int, int, int]]:
        """(answer start, answer end, end-of-turn end) in `real` for each assistant message."""
        spans = []
        for i, (start, end) in self._answer_spans(msgs, real, add_generation_prompt).items():
            limit = starts[i + 1] if starts[i + 1] >= end else len(real)
            spans.append((start, end, end + len(self._end_of_turn(real[end:limit]))))
        return spans

    def _jinja(self, messages: list[Message], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (jinja2.TemplateError, ValueError) as exc:
            raise TutorError(
                f"the tokenizer's chat template rejected the conversation: {exc}"
            ) from exc

    def _answer_spans(
        self, msgs: list[Message], real: str, add_generation_prompt: bool
    ) -> dict[int, tuple[int, int]]:
        """Where each assistant content sits in `real` (steps 1-2 of the module docstring)."""
        which = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        marked = list(msgs)
        for j, i in enumerate(which):
            marked[i] = {**msgs[i], "content": _sentinel(j)}
        skeleton = self._jinja(marked, add_generation_prompt)
        pieces, rest = [], skeleton
        for j in range(len(which)):
            head, found, rest = rest.partition(_sentinel(j))
            if not found or _sentinel(j) in rest:
                raise self._cannot_split(f"answer {j} does not appear exactly once")
            pieces.append(head)
        pieces.append(rest)
        spans, pos = {}, 0
        for j, i in enumerate(which):
            if not real.startswith(pieces[j], pos):
                raise self._cannot_split("the template renders differently around the answers")
            pos += len(pieces[j])
            text = self._locate(msgs[i]["content"], real, pos, pieces[j + 1])
            if text is None:
                raise self._cannot_split(f"message {i}'s content was rewritten beyond stripping")
            spans[i] = (pos, pos + len(text))
            pos += len(text)
        if real[pos:] != pieces[-1]:
            raise self._cannot_split("the template renders differently after the last answer")
        return spans

    @staticmethod
    def _locate(content: str, real: str, pos: int, following: str) -> str | None:
        """The form of `content` (as is / stripped) that sits at `real[pos:]`."""
        for text in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if real.startswith(text, pos) and real.startswith(following, pos + len(text)):
                return text
        return None

    def _turn_starts(
        self, msgs: list[Message], real: str, add_generation_prompt: bool
    ) -> list[int]:
        """starts[k] = where message k begins in `real`; starts[len(msgs)] = end of the turns.

        Rendering ``msgs[:k]`` gives the text before message k; its common prefix with the
        full rendering tolerates templates that close a conversation differently (Phi-3
        appends EOS) at the cost of a few characters of the next header. A prefix the
        template rejects gets the previous start (only role labels depend on it).
        """
        starts = [0]
        for k in range(1, len(msgs) + 1):
            if k == len(msgs) and not add_generation_prompt:
                starts.append(len(real))
                continue
            try:
                prefix = self._jinja(msgs[:k], False)
            except TutorError:
                prefix = real[: starts[-1]]
            common = len(os.path.commonprefix([prefix, real]))
            starts.append(max(common, starts[-1]))
        return starts

    def _end_of_turn(self, gap: str) -> str:
        """`gap` (text after an answer, before the next turn) up to its first special token."""
        best = None
        for token in self.special_tokens:  # longest first, so ties go to the longer token
            at = gap.find(token)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, token)
        return "" if best is None else gap[: best[0] + len(best[1])]

    def _probe_stop_words(self) -> tuple[str, ...]:
        """The end-of-turn special token of this template (and EOS), found on a probe chat."""
        words: list[str] = []
        try:
            real = self._jinja(_PROBE, False)
            starts = self._turn_starts(_PROBE, real, False)
            [(_, end, eot_end)] = self._trained_spans(_PROBE, real, False, starts)
            words = [t for t in self.special_tokens if t in real[end:eot_end]]
        except TutorError:
            pass  # a template that rejects the probe still stops on EOS
        eos = self.tokenizer.eos_token
        return tuple(dict.fromkeys([*words, *([eos] if eos else [])]))

    def _cannot_split(self, why: str) -> TutorError:
        return TutorError(
            f"cannot split the tokenizer's chat template into trainable segments: {why}; "
            "use a named template instead (tutor.templates.list_templates())"
        )
