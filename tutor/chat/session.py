"""Talking to a model: a chat session with history, templates, stop words and streaming.

A `ChatSession` keeps the conversation, renders it with a chat template (the one the
model was trained with: `tutor.templates`), trims the oldest turns when the prompt
would not fit the context window, decodes with `model.generate` (greedy by default,
so answers are reproducible) and stops at the template's end-of-turn words. Text can
be streamed to a callback as it is generated; the terminal loop (`tutor.chat.repl`)
and the notebook widget (`tutor.course.chat_widget`) are thin layers over the same session.

`reply()` / `ask()` are the one-shot helpers used by the quickstart and the demo.

Not handled here: batched chats (one conversation at a time), tool calls, images, or
token-exact continuation of a cache between turns (each turn re-encodes the prompt;
for a chat of a few thousand tokens on a small model that costs one prefill).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tutor.common import Message
from tutor.errors import TutorError
from tutor.templates import ChatTemplate, get_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TextCallback = Callable[[str], None]


@dataclass
class GenerationSettings:
    """How to decode. `temperature == 0` means greedy (the default: reproducible).

    `prompt_lookup` > 0 turns on prompt-lookup decoding for greedy chats: when the
    last tokens also occur earlier in the conversation, the tokens that followed there
    are guessed and up to `prompt_lookup` guesses are verified in one forward pass.
    Off by default: bench/chat_speed.py measured 0.7-1.3x on CPU (it pays off only when
    answers copy from the prompt), and in bf16/8-bit the batched verification rounds
    differently, so greedy answers can change. Ignored when sampling.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    prompt_lookup: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (sampling only when temperature > 0)."""
        if self.max_new_tokens < 1:
            raise TutorError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise TutorError(
                "need temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0 "
                f"(got {self.temperature}, {self.top_p}, {self.repetition_penalty})"
            )
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw["do_sample"] = False
            if self.prompt_lookup > 0:
                kw["prompt_lookup_num_tokens"] = self.prompt_lookup
        return kw


@dataclass
class Generation:
    """One generated turn: its text (stop words removed), token count and wall time."""

    text: str
    new_tokens: int
    prompt_tokens: int
    seconds: float
    stopped_by: str = "length"  # "stop word", "eos" or "length"

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


class StopWordFilter:
    """Pass streamed text on, holding back anything that may be the start of a stop word.

    Stop words that are special tokens never reach the text (they are skipped when
    decoding); this handles stop words written as plain text, e.g. "### Human:".
    Leading whitespace is dropped and trailing whitespace waits for more text, so the
    pieces sent always join to `text.strip()`, the answer that is returned and kept.
    """

    def __init__(self, stop_words: Sequence[str], on_text: TextCallback | None) -> None:
        self.stop_words = [w for w in stop_words if w]
        self.on_text = on_text
        self.text = ""  # everything decoded so far, cut at the first stop word
        self.sent = 0  # `text[:sent]` has been passed to `on_text`
        self.stopped = False

    def feed(self, piece: str, final: bool = False) -> None:
        if self.stopped:
            return
        self.text += piece
        cut = min((i for i in (self.text.find(w) for w in self.stop_words) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped, final = self.text[:cut], True, True
        ready = self.text if final else self.text[:len(self.text) - self._held_back()]
        end = len(ready.rstrip())
        start = max(self.sent, len(self.text) - len(self.text.lstrip()))
        if end > start:
            if self.on_text is not None:
                self.on_text(self.text[start:end])
            self.sent = end

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop word."""
        best = 0
        for w in self.stop_words:
            for k in range(min(len(w) - 1, len(self.text)), best, -1):
                if self.text.endswith(w[:k]):
                    best = k
                    break
        return best


def _streamer(tokenizer: PreTrainedTokenizerBase, filt: StopWordFilter) -> Any:
    """A transformers `TextStreamer` whose finished pieces go into `filt`, not stdout."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            filt.feed(text, final=stream_end)

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_words: Sequence[str]) -> list[int]:
    """EOS plus every stop word that is a single token (those stop `generate` directly)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for word in stop_words:
        tok = tokenizer.encode(word, add_special_tokens=False)
        if len(tok) == 1:
            ids.add(tok[0])
    return sorted(ids)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    settings: GenerationSettings | None = None,
    stop_words: Sequence[str] = (),
    on_text: TextCallback | None = None,
) -> Generation:
    """Continue `prompt_ids` (one conversation, already rendered) until a stop word.

    Single-token stop words and EOS stop `generate` as end-of-sequence ids; longer ones
    stop it as `stop_strings`, are cut from the text, and are held back from `on_text`
    while they may be forming. `on_text` receives the answer in pieces as it is decoded.
    """
    import torch

    settings = settings or GenerationSettings()
    stops = stop_token_ids(tokenizer, stop_words)
    texts = [w for w in stop_words if len(tokenizer.encode(w, add_special_tokens=False)) > 1]
    extra = {"stop_strings": texts, "tokenizer": tokenizer} if texts else {}
    filt = StopWordFilter(stop_words, on_text)
    input_ids = torch.tensor([prompt_ids], device=model.device)  # (1, T)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            streamer=_streamer(tokenizer, filt),
            **extra,
            **settings.generate_kwargs(),
        )
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1]:].tolist()  # (T_new,)
    stopped_by = "eos" if new and new[-1] in stops else "length"
    if filt.stopped:
        stopped_by = "stop word"
    return Generation(filt.text.strip(), len(new), len(prompt_ids), seconds, stopped_by)


def context_window(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the model can attend to: the config's limit, or the tokenizer's if smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**9]
    if not limits:
        raise TutorError("cannot tell the model's context window; pass context_window=")
    return min(limits)


@dataclass
class ChatSession:
    """A multi-turn conversation with one model.

    `template`: a name from `tutor.templates.list_templates()` ("auto" = the
    tokenizer's own Jinja) or a `ChatTemplate`. `history` holds user/assistant
    messages; the system prompt is kept apart so `/reset` can keep it.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    template: str | ChatTemplate = "auto"
    system: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    context_window: int | None = None
    history: list[Message] = field(default_factory=list)
    trimmed: int = 0  # messages dropped from the front of `history` so far
    last: Generation | None = None
    # The token loop: `generate` (transformers) or another backend with the same signature
    # (tutor.chat.llamacpp.generate runs a GGUF file in llama.cpp).
    decoder: Callable[..., Generation] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.template, str):
            self.template = get_template(self.template, tokenizer=self.tokenizer)
        if self.context_window is None:
            self.context_window = context_window(self.model, self.tokenizer)

    def messages(self, user_text: str | None = None) -> list[Message]:
        """The conversation as the model sees it: system, history, then `user_text`."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.history
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return msgs

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of the prompt for `user_text`, dropping the oldest turns to fit.

        The prompt plus `max_new_tokens` must fit the context window; whole
        user/assistant pairs are dropped from the front (never the system prompt or
        the new message). Raises `TutorError` when even the new message alone is too long.
        """
        budget = self.context_window - self.settings.max_new_tokens
        while True:
            text = self.template.render(self.messages(user_text), add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) <= budget:
                return ids
            if not self.history:
                raise TutorError(
                    f"the message needs {len(ids)} prompt tokens but only {budget} fit "
                    f"(context {self.context_window} - max_new_tokens "
                    f"{self.settings.max_new_tokens}); shorten it or lower --max-new-tokens"
                )
            del self.history[:2]
            self.trimmed += 2

    def send(self, user_text: str, on_text: TextCallback | None = None) -> str:
        """Answer `user_text`, streaming pieces to `on_text`; both turns join the history."""
        ids = self.prompt_ids(user_text)
        self.last = (self.decoder or generate)(self.model, self.tokenizer, ids, self.settings,
                                               self.template.stop_words, on_text)
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": self.last.text}]
        return self.last.text

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
        self.trimmed = 0


def reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    max_new_tokens: int = 64,
    template: str | ChatTemplate = "auto",
) -> str:
    """Greedy-decode the assistant's next turn after `messages` and return its text.

    Greedy (no sampling) so that the same model always gives the same answer: tests
    and notebooks can compare answers before and after fine-tuning.
    """
    if isinstance(template, str):
        template = get_template(template, tokenizer=tokenizer)
    text = template.render(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    return generate(model, tokenizer, ids, settings, template.stop_words).text


def reply_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[Message]],
    max_new_tokens: int = 64,
    template: str | ChatTemplate = "auto",
    batch_size: int = 16,
) -> list[str]:
    """`reply` to many conversations, `batch_size` at a time: one greedy answer each.

    Prompts are left-padded into one batch (HF `generate` takes positions from the
    attention mask), decoded together until every row stopped, then each row's text is
    cut at its first stop word exactly as `generate` cuts a single answer. On a CPU one
    batched decode step costs little more than a single one, so scoring a file is several
    times faster. The answers equal one-at-a-time `reply` answers up to float rounding of
    the padded shapes, which can flip a greedy token only where two logits tie to ~1e-6
    (tests/test_eval.py compares both on the bundled model). Not handled: sampling.
    """
    import torch

    if isinstance(template, str):
        template = get_template(template, tokenizer=tokenizer)
    stops = stop_token_ids(tokenizer, template.stop_words)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers = []
    for start in range(0, len(conversations), batch_size):
        prompts = [tokenizer.encode(template.render(m, add_generation_prompt=True),
                                    add_special_tokens=False)
                   for m in conversations[start:start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts],
                           device=model.device)  # (B, T), left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stops,
                                 pad_token_id=pad, max_new_tokens=max_new_tokens,
                                 do_sample=False)
        for row in out[:, width:].tolist():  # (B, T_new): rows that ended early are padded
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            filt = StopWordFilter(template.stop_words, None)
            filt.feed(tokenizer.decode(row[:end], skip_special_tokens=True), final=True)
            answers.append(filt.text.strip())
    return answers


def ask(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, **kw) -> str:
    """Reply to a single user question (no system prompt of our own)."""
    return reply(model, tokenizer, [{"role": "user", "content": question}], **kw)
