"""encode(): parity with apply_chat_template, exact loss masks, BOS once, truncation, datasets.

The bundled tokenizer is ChatML: <|im_start|>=1 (also its bos_token), <|im_end|>=2 (eos).
The mask oracle below is written in token ids, independently of encode()'s character
offsets: after each assistant header ``<|im_start|> ass istant`` every token up to and
including the next <|im_end|> is trained, except the header's own "\\n" token (unless BPE
merged it with newlines that start the answer).
"""

from __future__ import annotations

import dataclasses
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tutor.data import IGNORE_INDEX, adds_bos, encode, encode_dataset, load_conversations
from tutor.errors import TutorError
from tutor.templates import get_template, list_templates

IM_START, IM_END, NL = 1, 2, 198
ASSISTANT_HEADER = [IM_START, 520, 9531]  # "<|im_start|>" "ass" "istant"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tutor.models import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def bos_tok(tok):
    """A tokenizer with a real, distinct BOS (<|endoftext|>=0) that it adds to plain text,
    like Llama's, and a Jinja template that also writes {{ bos_token }}: the classic
    recipe for a doubled BOS."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                eos_token="<|im_end|>", pad_token="<|im_end|>")
    t.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + "
                       "'\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}")
    return t


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


VARIED = [
    [u("Hi"), a("Hello!")],
    [u("What is 2+2?"), a("4")],
    [s("Be brief."), u("Capital of France?"), a("Paris.")],
    [s(""), u("empty system"), a("ok")],
    [u("Who are you?"), a("I'm Pico, made by the Tutor Lab.")],
    [u("你是谁？"), a("我是 Pico，由 Tutor Lab 开发。")],
    [u("世界第一高峰是？"), a("珠穆朗玛峰")],
    [u("emoji"), a("😀 🎉 done")],
    [u("list"), a("\n\n- step one\n- step two")],
    [u("code"), a("```python\ndef f(x):\n    return x  # comment\n```")],
    [u("  leading spaces"), a("  and trailing  ")],
    [u("tabs\tand\ttabs"), a("a\tb")],
    [u("empty answer"), a("")],
    [u("whitespace answer"), a(" \n ")],
    [u("one"), a("1"), u("two"), a("2")],
    [u("one"), a("1"), u("two"), a("2"), u("three"), a("3")],
    [s("sys"), u("q1"), a("a1"), u("q2"), a("a2")],
    [u("q"), a("first"), a("second answer in a row")],
    [u("numbers 1234567890"), a("3.14159, 2.71828 and 1e-4")],
    [u("quotes \"double\" and 'single'"), a("«guillemets» — dashes – and …")],
    [u("accents"), a("café naïve résumé")],
    [u("URL"), a("see https://example.org/a?b=c&d=e")],
    [a("Plain pretraining text, every token trained.")],
]


def oracle_labels(ids: list[int], tokenizer) -> list[int]:
    """Expected ChatML labels from token ids alone (see the module docstring)."""
    labels = [IGNORE_INDEX] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + 3] == ASSISTANT_HEADER:
            j = i + 3
            if tokenizer.decode([ids[j]]) == "\n":
                j += 1  # the header's newline alone is scaffolding
            while True:
                labels[j] = ids[j]
                if ids[j] == IM_END:
                    break
                j += 1
            i = j
        i += 1
    return labels


def check_chatml_sample(msgs, sample, tokenizer, reference_ids):
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids == reference_ids
    assert len(labels) == len(ids)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
    assert labels == oracle_labels(ids, tokenizer)
    # end-of-turn trained once per assistant turn, never elsewhere
    n_answers = sum(m["role"] == "assistant" for m in msgs)
    assert sum(lab == IM_END for lab in labels) == n_answers
    # BOS once: <|im_start|> opens the sequence, is never doubled, and otherwise only
    # opens turns (one per message, plus the injected default system turn)
    assert ids[0] == IM_START and ids[1] != IM_START
    assert ids.count(IM_START) == len(msgs) + (msgs[0]["role"] != "system")
    # every answer is fully trained: run k of trained tokens decodes to answer k + <|im_end|>
    # (plus the header's newline when BPE merged it with newlines that open the answer)
    runs, run = [], []
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers, strict=True):
        text = tokenizer.decode(run)
        merged = answer[:1].isspace() and text == "\n" + answer + "<|im_end|>"
        assert text == answer + "<|im_end|>" or merged


@pytest.mark.parametrize("msgs", VARIED[:-1], ids=range(len(VARIED) - 1))
def test_parity_and_mask_on_varied_conversations(tok, msgs):
    sample = encode(msgs, tok)
    reference = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    check_chatml_sample(msgs, sample, tok, reference)


# Fragments rather than single characters, so BPE has words, spaces and newlines to merge.
FRAGMENTS = list("ab Zé.\n\t,!?-'你好世界😀0") + [" the", "\n\n", "Hello", "  ", " 123"]
TEXT = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)


@st.composite
def conversations(draw):
    msgs = [s(draw(TEXT))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [u(draw(TEXT)), a(draw(TEXT))]
    return msgs


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations())
def test_parity_property(tok, msgs):
    sample = encode(msgs, tok)
    reference = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    check_chatml_sample(msgs, sample, tok, reference)


def test_exact_ids_and_labels_of_a_small_chat(tok):
    sample = encode([s("S"), u("Hi"), a("Hello!")], tok, template="chatml")
    assert sample["input_ids"] == [1, 9690, 198, 67, 2, 198, 1, 4093, 198, 26843, 2, 198,
                                   1, 520, 9531, 198, 19556, 17, 2, 198]
    assert sample["labels"] == [IGNORE_INDEX] * 16 + [19556, 17, 2, IGNORE_INDEX]


def test_named_chatml_equals_auto_when_system_given(tok):
    msgs = [s("Be kind."), u("q1"), a("a1"), u("q2"), a("a2")]
    assert encode(msgs, tok, "chatml") == encode(msgs, tok, "auto")


def test_segment_wise_tokenisation_would_differ(tok):
    """Why encode() tokenises the whole text: BPE merges newlines across the boundary."""
    msgs = [u("list"), a("\n\n- step")]
    segments = get_template("auto", tok).segments(msgs)
    naive = [t for seg in segments for t in tok(seg.text, add_special_tokens=False)["input_ids"]]
    whole = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert naive != whole
    assert encode(msgs, tok)["input_ids"] == whole


def test_straddling_tokens_are_counted(tok):
    from tutor.data import encode_sample

    def straddling(msgs, template="auto"):
        return encode_sample(msgs, tok, template, None, "all")[1].straddling

    assert straddling([u("list"), a("\n\n- step")]) == 1  # the header's ⏎ merged into "⏎⏎"
    assert straddling([u("Hi"), a("Hello"), u("again"), a("你好")]) == 0
    assert straddling([u("Hi"), a("Hello")], "mistral") == 1  # "[/INST]" + " Hello" → " Hello"


def test_train_on_last(tok):
    msgs = [u("one"), a("1"), u("two"), a("2")]
    full, last = encode(msgs, tok), encode(msgs, tok, train_on="last")
    assert full["input_ids"] == last["input_ids"]
    trained = [t for t in last["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == "2<|im_end|>"
    assert tok.decode([t for t in full["labels"] if t != IGNORE_INDEX]) == "1<|im_end|>2<|im_end|>"


def test_pretraining_text_has_no_scaffolding(tok):
    text = "Plain pretraining text, every token trained."
    sample = encode([a(text)], tok)
    body = tok(text, add_special_tokens=False)["input_ids"]
    assert sample == {"input_ids": body + [IM_END], "labels": body + [IM_END]}
    assert not adds_bos(tok)  # ChatML: no BOS in front of plain text, so none is added


def test_bos_once_with_a_tokenizer_that_adds_its_own(bos_tok):
    msgs = [u("Hi"), a("Hello")]
    rendered = bos_tok.apply_chat_template(msgs, tokenize=False)
    assert bos_tok(rendered)["input_ids"][:2] == [0, 0]  # the naive way doubles BOS
    sample = encode(msgs, bos_tok)
    assert sample["input_ids"] == bos_tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert sample["input_ids"].count(0) == 1 and sample["input_ids"][0] == 0
    assert bos_tok.decode([t for t in sample["labels"] if t != IGNORE_INDEX]) == "Hello<|im_end|>"
    # pretraining: this tokenizer adds BOS to plain text, so exactly one, untrained
    assert adds_bos(bos_tok)
    text = encode([a("plain text")], bos_tok)
    body = bos_tok("plain text", add_special_tokens=False)["input_ids"]
    assert text == {"input_ids": [0, *body, 2], "labels": [IGNORE_INDEX, *body, 2]}


def test_template_rendering_bos_twice_is_an_error(bos_tok):
    doubled = dataclasses.replace(get_template("chatml"), bos="<|endoftext|><|endoftext|>")
    with pytest.raises(TutorError, match="renders BOS twice"):
        encode([u("Hi"), a("Hello")], bos_tok, template=doubled)


def test_truncation_keeps_the_mask_and_empty_masks_raise(tok):
    msgs = [u("Hi"), a("Hello there, friend.")]
    full = encode(msgs, tok)
    n = len(full["input_ids"])
    cut = encode(msgs, tok, max_length=n - 3)
    assert cut == {k: v[: n - 3] for k, v in full.items()}
    assert cut["labels"][-1] != IGNORE_INDEX  # cut inside the answer: still trained there
    first_trained = next(i for i, t in enumerate(full["labels"]) if t != IGNORE_INDEX)
    with pytest.raises(TutorError, match=f"no trainable token left after truncation to "
                                         f"max_length={first_trained}"):
        encode(msgs, tok, max_length=first_trained)
    assert encode(msgs, tok, max_length=first_trained + 1)["labels"][-1] == full["labels"][
        first_trained]


def test_empty_answer_without_end_of_turn_text_is_an_error(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    labels = encode([u("q"), a("yes")], plain)["labels"]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " yes"  # " yes" straddles
    with pytest.raises(TutorError, match="no trainable token: the answers are empty and the "
                                         "template has no end-of-turn text"):
        encode([u("q"), a("")], plain)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_on": "first"}, "train_on must be one of all, last, not 'first'"),
    ({"max_length": 0}, "max_length must be a positive integer or None, not 0"),
    ({"template": "chatmll"}, "unknown chat template 'chatmll'; did you mean chatml"),
])
def test_bad_options(tok, kwargs, message):
    with pytest.raises(TutorError, match=message):
        encode([u("Hi"), a("Yo")], tok, **kwargs)


@pytest.mark.parametrize(("msgs", "message"), [
    ([], "messages: a conversation needs at least one message"),
    ([u("only a question")], "messages: no assistant message, so nothing to train on"),
    ([{"role": "tool", "content": "x"}, a("y")], "messages: message 0: role 'tool' is not"),
    ([u("q"), s("late"), a("x")], "messages: message 1: a system message is only allowed"),
])
def test_bad_messages(tok, msgs, message):
    with pytest.raises(TutorError, match=message):
        encode(msgs, tok)


def test_slow_tokenizer_is_refused():
    slow = types.SimpleNamespace(is_fast=False, bos_token_id=None)
    with pytest.raises(TutorError, match="encode needs a fast tokenizer"):
        encode([u("Hi"), a("Yo")], slow, template="chatml")


def test_encode_dataset_drops_and_counts(tok):
    ds = load_conversations(_dataset([[u("Hi"), a("Yo")], [u("long " * 60), a("late")],
                                      [a("pretraining text")]]))
    with pytest.warns(UserWarning, match=r"3 samples: 2 kept, 1 dropped .* \(rows \[1\]\)"):
        enc, report = encode_dataset(ds, tok, max_length=48)
    assert (report.samples, report.kept, report.dropped, report.dropped_rows) == (3, 2, 1, [1])
    assert report.truncated == 1
    assert enc.column_names == ["input_ids", "labels"]
    assert enc[0] == encode([u("Hi"), a("Yo")], tok, max_length=48)
    assert enc[1] == encode([a("pretraining text")], tok)
    assert report.tokens == len(enc[0]["input_ids"]) + len(enc[1]["input_ids"])
    assert report.trainable_tokens == sum(t != IGNORE_INDEX for r in enc for t in r["labels"])


def test_encode_dataset_num_proc_matches(tok):
    ds = load_conversations("tutor/configs/data/geography_qa.jsonl").select(range(12))
    one, _ = encode_dataset(ds, tok)
    two, _ = encode_dataset(ds, tok, num_proc=2)
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def test_encode_dataset_cache(tok, tmp_path, monkeypatch):
    ds = load_conversations("tutor/configs/data/raw_qa.csv")
    first, report = encode_dataset(ds, tok, cache_dir=tmp_path)
    assert first.cache_files and str(tmp_path) in first.cache_files[0]["filename"]

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of loading the cache")

    monkeypatch.setattr("tutor.data._encode_row", boom)
    again, report2 = encode_dataset(load_conversations("tutor/configs/data/raw_qa.csv"), tok,
                                    cache_dir=tmp_path)
    assert again["input_ids"] == first["input_ids"] and str(report2) == str(report)


def test_encode_dataset_needs_messages(tok):
    import datasets

    with pytest.raises(TutorError, match=r"needs a 'messages' column \(has \['text'\]\)"):
        encode_dataset(datasets.Dataset.from_list([{"text": "a"}]), tok)
    bad = datasets.Dataset.from_dict({"messages": [[u("a"), a("b")], [u("only")]]})
    with pytest.raises(TutorError, match="dataset row 1: messages: no assistant message"):
        encode_dataset(bad, tok)


def _dataset(conversations):
    import datasets

    return datasets.Dataset.from_dict({"messages": conversations})


CHATML_VOCAB = ("auto", "chatml", "default", "qwen_chat", "internlm2_chat")


@pytest.mark.parametrize("name", list_templates())
def test_every_named_template_masks_its_answers(tok, name):
    """Any template on the bundled tokenizer: ids are the whole rendered text tokenised once,
    each answer + end-of-turn text is trained, no user/system text is. Templates whose markers
    are special tokens of this vocabulary (ChatML family) train exactly the trainable segments;
    foreign markers are plain text here, so BPE may merge a boundary character into a trained
    token (e.g. Mistral's space before the answer) — the answer is still fully covered."""
    msgs = [u("Hi there"), a("Hello! How can I help?"), u("Who are you?"), a("I am Pico.")]
    template = get_template(name, tok)
    segments = template.segments(msgs)
    sample = encode(msgs, tok, name)
    assert sample["input_ids"] == tok(template.render(msgs), add_special_tokens=False)["input_ids"]
    runs, run = [], []
    for t in sample["labels"] + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    answers, previous = [], False  # runs of consecutive trainable segments: content + eot
    for seg in segments:
        if seg.trainable and previous:
            answers[-1] += seg.text
        elif seg.trainable:
            answers.append(seg.text)
        previous = seg.trainable
    assert len(runs) == len(answers) == 2
    for got, want in zip(runs, answers, strict=True):
        assert want in got and len(got) - len(want) <= 2, (got, want)
    untrained = tok.decode([t for t, lab in zip(sample["input_ids"], sample["labels"],
                                                 strict=True) if lab == IGNORE_INDEX])
    assert "Hi there" in untrained and "Who are you?" in untrained and "Pico" not in untrained
    if name in CHATML_VOCAB:
        assert runs == answers
