"""Talking to a model: one reply from a list of messages.

This is the seed of the chat module (sessions, streaming, stop words and the
terminal loop grow here). The prompt is built with the tokenizer's own chat
template, so the model sees exactly the format it was trained on.

Not handled here yet: history trimming, streaming, named templates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


def reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    max_new_tokens: int = 64,
) -> str:
    """Greedy-decode the assistant's next turn after `messages` and return its text.

    Greedy (no sampling) so that the same model always gives the same answer: tests
    and notebooks can compare answers before and after fine-tuning.
    """
    import torch

    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = out[0, enc["input_ids"].shape[1] :]  # (T_new,)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def ask(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, **kw) -> str:
    """Reply to a single user question (no system prompt of our own)."""
    return reply(model, tokenizer, [{"role": "user", "content": question}], **kw)
