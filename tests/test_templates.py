"""Chat templates render exactly as the official Jinja, and cut into correct segments.

The official Jinja strings live in tests/fixtures/chat_templates/<name>.jinja (sources in
the README there) and are rendered with transformers' own renderer, never ours.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tutor.errors import TutorError
from tutor.templates import FormatTemplate, Segment, get_template, list_templates

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# name -> (bos_token, eos_token) the family's tokenizer passes to its Jinja, and the
# end-of-turn text that must be trained after each answer.
FAMILIES = {
    "default": ("", "", "<|im_end|>"),
    "chatml": ("", "", "<|im_end|>"),
    "qwen_chat": ("", "<|im_end|>", "<|im_end|>"),
    "internlm2_chat": ("<s>", "</s>", "<|im_end|>"),
    "internlm_chat": ("<s>", "</s>", "<eoa>"),
    "llama2_chat": ("<s>", "</s>", " </s>"),
    "llama3_chat": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>", "</s>"),
    "zephyr": ("<s>", "</s>", "</s>"),
    "gemma": ("<bos>", "<eos>", "<end_of_turn>"),
    "phi3_chat": ("<s>", "<|endoftext|>", "<|end|>"),
    "deepseek_v2": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "vicuna": ("<s>", "</s>", "</s>"),
}
STRIPPING = {"llama2_chat", "llama3_chat", "gemma"}  # official Jinja strips contents

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATIONS = {
    "one_turn": [_m("user", "What is the capital of France?"), _m("assistant", "Paris.")],
    "system": [
        _m("system", "You are a geography expert."),
        _m("user", "Highest mountain?"),
        _m("assistant", "Mount Everest."),
    ],
    "multi_turn": [
        _m("system", "Be brief."),
        _m("user", "Hi"),
        _m("assistant", "Hello! How can I help?"),
        _m("user", "2+2?"),
        _m("assistant", "4"),
    ],
    "multi_no_system": [
        _m("user", "Name a colour."),
        _m("assistant", "Blue."),
        _m("user", "Another one."),
        _m("assistant", "Green."),
    ],
    "whitespace": [
        _m("user", "  padded question \n"),
        _m("assistant", "\n  an answer with spaces  \n"),
    ],
    "chinese": [
        _m("system", "你是一个地理知识专家"),
        _m("user", "世界第一高峰是？"),
        _m("assistant", "珠穆朗玛峰"),
    ],
    "open_question": [
        _m("user", "Tell me a joke."),
        _m("assistant", "Why did the chicken cross the road?"),
        _m("user", "Why?"),
    ],
    "user_only": [_m("user", "Hello there")],
    "assistant_only": [_m("assistant", "Plain text, as in incremental pretraining.")],
    "two_users_in_a_row": [_m("user", "One."), _m("user", "Two."), _m("assistant", "Three.")],
    "whitespace_only_user": [
        _m("system", "  Be kind.  "),
        _m("user", " \n "),
        _m("assistant", "  ok  "),
    ],
    "empty_answer": [_m("user", "Say nothing."), _m("assistant", "")],
}


def official(name: str, messages, add_generation_prompt: bool) -> str:
    """Render `messages` with the family's official Jinja through transformers' renderer."""
    bos, eos, _ = FAMILIES[name]
    jinja = (FIXTURES / f"{name}.jinja").read_text()
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=jinja,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
    return rendered[0]


def trainable_runs(segments: list[Segment]) -> list[str]:
    """Maximal runs of consecutive trainable segments, as strings."""
    runs, current = [], None
    for seg in segments:
        if seg.trainable:
            current = (current or "") + seg.text
        elif current is not None:
            runs.append(current)
            current = None
    return runs + ([current] if current is not None else [])


def expected_runs(messages, end_of_turn: str, strip: bool) -> list[str]:
    return [
        (m["content"].strip() if strip else m["content"]) + end_of_turn
        for m in messages
        if m["role"] == "assistant"
    ]


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_named_template_renders_like_official_jinja(name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    try:
        expected = official(name, messages, add_generation_prompt)
    except jinja2.TemplateError:  # the official template rejects it (e.g. no system role)
        with pytest.raises(TutorError):
            get_template(name).render(messages, add_generation_prompt)
        return
    assert get_template(name).render(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_named_template_segments(name, conversation):
    template = get_template(name)
    messages = CONVERSATIONS[conversation]
    try:
        template.render(messages)
    except TutorError:
        return  # covered by the rendering test
    for agp in (False, True):
        segments = template.segments(messages, add_generation_prompt=agp)
        assert "".join(s.text for s in segments) == template.render(messages, agp)
        assert all(s.text for s in segments), "no empty segments"
        assert trainable_runs(segments) == expected_runs(
            messages, FAMILIES[name][2], name in STRIPPING
        )
        assert all(s.role == "assistant" for s in segments if s.trainable)
        if agp and template.generation_prompt:  # last, never trained
            assert segments[-1] == Segment(template.generation_prompt, "assistant", False)


def test_every_registered_template_is_tested():
    assert set(list_templates()) == {"auto", *FAMILIES}
    assert all(isinstance(get_template(n), FormatTemplate) for n in FAMILIES)


def test_stop_words_are_the_end_of_turn_strings():
    for name, (_, _, end_of_turn) in FAMILIES.items():
        stops = get_template(name).stop_words
        assert stops and all(stop in end_of_turn for stop in stops), name


def test_chatml_segments_exactly():
    segs = get_template("chatml").segments(CONVERSATIONS["one_turn"], add_generation_prompt=False)
    assert segs == [
        Segment("<|im_start|>user\n", "user", False),
        Segment("What is the capital of France?", "user", False),
        Segment("<|im_end|>", "user", False),
        Segment("\n", "user", False),
        Segment("<|im_start|>assistant\n", "assistant", False),
        Segment("Paris.", "assistant", True),
        Segment("<|im_end|>", "assistant", True),
        Segment("\n", "assistant", False),
    ]


# ---------------------------------------------------------------- auto (tokenizer Jinja)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from tutor.models import ensure_bundled

    return AutoTokenizer.from_pretrained(ensure_bundled())


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_auto_matches_apply_chat_template(smol_tokenizer, conversation, add_generation_prompt):
    auto = get_template("auto", tokenizer=smol_tokenizer)
    messages = CONVERSATIONS[conversation]
    expected = smol_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert auto.render(messages, add_generation_prompt) == expected
    segments = auto.segments(messages, add_generation_prompt)
    assert "".join(s.text for s in segments) == expected
    assert trainable_runs(segments) == expected_runs(messages, "<|im_end|>", strip=False)
    assert SMOL_SYSTEM not in "".join(s.text for s in segments if s.trainable)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_auto_equals_chatml_up_to_default_system_prompt(smol_tokenizer, conversation):
    auto = get_template("auto", tokenizer=smol_tokenizer)
    messages = CONVERSATIONS[conversation]
    with_system = (
        messages if messages[0]["role"] == "system" else [_m("system", SMOL_SYSTEM), *messages]
    )
    assert auto.render(messages, True) == get_template("chatml").render(with_system, True)
    auto_runs = trainable_runs(auto.segments(messages))
    assert auto_runs == trainable_runs(get_template("chatml").segments(with_system))


def test_auto_segments_exactly(smol_tokenizer):
    segs = get_template("auto", tokenizer=smol_tokenizer).segments(CONVERSATIONS["one_turn"])
    head = f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert segs == [
        Segment(head + "What is the capital of France?<|im_end|>\n", "user", False),
        Segment("<|im_start|>assistant\n", "assistant", False),
        Segment("Paris.", "assistant", True),
        Segment("<|im_end|>", "assistant", True),
        Segment("\n", "assistant", False),
    ]


def test_auto_stop_words(smol_tokenizer):
    assert get_template("auto", tokenizer=smol_tokenizer).stop_words == ("<|im_end|>",)


def _with_template(tokenizer, jinja: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = jinja
    return tok


def test_auto_refuses_a_template_that_rewrites_answers(smol_tokenizer):
    upper = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper"
        " + '<|im_end|>\\n' }}{% endfor %}"
    )
    auto = get_template("auto", tokenizer=_with_template(smol_tokenizer, upper))
    assert auto.render(CONVERSATIONS["one_turn"]).endswith("PARIS.<|im_end|>\n")
    with pytest.raises(TutorError, match="cannot split .* rewritten"):
        auto.segments(CONVERSATIONS["one_turn"])


def test_auto_template_rejecting_a_conversation_is_a_tutor_error(smol_tokenizer):
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    auto = get_template("auto", tokenizer=_with_template(smol_tokenizer, strict))
    with pytest.raises(TutorError, match="rejected the conversation: no system"):
        auto.render(CONVERSATIONS["system"])


def test_auto_needs_a_tokenizer_with_a_chat_template(smol_tokenizer):
    with pytest.raises(TutorError, match="pass tokenizer="):
        get_template("auto")
    with pytest.raises(TutorError, match="no chat_template"):
        get_template("auto", tokenizer=_with_template(smol_tokenizer, None))


# ---------------------------------------------------------------- bad input


def test_unknown_name_suggests_closest():
    with pytest.raises(TutorError, match="unknown chat template 'chatm1'; did you mean chatml"):
        get_template("chatm1")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "at least one message"),
        ("hello", "must be a list"),
        ({"role": "user", "content": "hi"}, "must be a list"),
        (["hi"], "message 0 must be a mapping"),
        ([_m("bot", "hi")], "message 0: role 'bot' is not one of system, user, assistant"),
        ([{"role": "user"}], "message 0 \\(user\\): 'content' must be a string"),
        ([_m("user", "a"), _m("system", "b")], "message 1: a system message is only allowed first"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(TutorError, match=match):
        get_template("chatml").render(messages)
