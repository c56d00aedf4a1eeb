"""The registry of named chat templates: one `FormatTemplate` per model family.

Each entry reproduces, character for character, the Jinja `chat_template` that the
family's tokenizer ships (named in `source`); tests/test_templates.py renders both
on the same conversations. Whitespace in these strings is significant.

Two names have no official Jinja and follow the family's reference code instead:
`internlm_chat` (InternLM-Chat v1 builds prompts in remote code; format as XTuner's
`internlm_chat`) and `vicuna` (FastChat's `vicuna_v1.1`). `default` is the ChatML
template transformers applied to tokenizers without one (until v4.43).

Not handled: tool calling, and the newer revisions of these families (Llama 3.1's
dated system header, Gemma 3's system role, Mistral v3's "[INST]" spacing); use
"auto" with the model's own tokenizer for those.
"""

from __future__ import annotations

from tutor.templates.base import FormatTemplate, Turn


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
