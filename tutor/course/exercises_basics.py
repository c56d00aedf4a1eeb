"""The course's exercises for notebooks 00-03 (04-08: `exercises_models`, 09:
`exercises_scale`): one small check function per exercise, registered by id.

Each check computes the expected answer from the package, the bundled model or the course
data when it runs, compares, and returns `right(why)` or `wrong(hint)`; typical mistakes get
their own hint (`judge(..., mistakes=...)`). How to add one: see the docstring of
`tutor.course.lab`. Heavy libraries are imported inside the checks, so
`from tutor.course import lab` stays cheap.

Not handled: answers given as strings of numbers ("12") are not converted; the hint says
which type is expected.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tutor.course.checks import (
    Hint,
    Verdict,
    as_float,
    as_int,
    as_str,
    bundled_model,
    bundled_tokenizer,
    exercise,
    judge,
    right,
    wrong,
)
from tutor.data import IGNORE_INDEX, encode
from tutor.datacheck import check_file, quality_pass
from tutor.formats import iter_conversations
from tutor.memory import get_arch
from tutor.models import footprint_bytes, load
from tutor.templates import get_template, list_templates
from tutor.train_config import DATA_DIR


def _trained(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


# ── 00 quickstart ─────────────────────────────────────────────────────────────────────


KV_TOKENS, KV_MEASURED = 2048, 256  # the exercise's conversation; the tokens the check runs


@exercise("00.1", "predict the bf16 KV cache (MiB) of 2,048 tokens from the config")
def _kv_cache_mib(answer: Any) -> Verdict:
    import torch

    model, _ = load(dtype="bfloat16")
    ids = torch.arange(1000, 1000 + KV_MEASURED).unsqueeze(0)  # any tokens: the cache's size
    with torch.inference_mode():  # depends only on their number
        cache = model(input_ids=ids, use_cache=True).cache
    measured = sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values))
    mib = measured * (KV_TOKENS // KV_MEASURED) / 2**20  # the cache grows linearly in tokens
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size
                                                                  // c.num_attention_heads)
    return judge(as_float(answer, "a number of MiB"), mib, rel=0.01,
                 why=f"2 (key, value) x {c.num_hidden_layers} layers x {c.num_key_value_heads} "
                     f"KV heads x {c.hidden_size // c.num_attention_heads} numbers x 2 bytes x "
                     f"{KV_TOKENS} tokens = {mib:.0f} MiB, measured on a real forward pass "
                     f"({KV_MEASURED} tokens, x {KV_TOKENS // KV_MEASURED})",
                 hint="2 (key and value) x layers x KV heads x head_dim x 2 bytes x 2048 tokens, "
                      "divided by 2**20",
                 mistakes=[(mib * c.num_attention_heads / c.num_key_value_heads,
                            "you used num_attention_heads: keys and values have only "
                            "num_key_value_heads heads (grouped-query attention)"),
                           (mib / 2, "a key *and* a value per token and head: twice that"),
                           (mib * 2, "that is fp32 (4 bytes); bf16 takes 2"),
                           (per_token * 2 * KV_TOKENS,
                            "that is in bytes: divide by 2**20 for MiB")])


@exercise("00.2", "measure: the share of the 4-bit model's bytes left unquantised")
def _unquantised_share(answer: Any) -> Verdict:
    import torch

    model = bundled_model(bits=4)
    # bitsandbytes stores NF4 weights as packed uint8; everything else keeps its float dtype
    kept = [p for p in model.parameters() if p.dtype != torch.uint8]
    kept_bytes = sum(p.numel() * p.element_size() for p in kept)
    total = footprint_bytes(model)
    share = kept_bytes / total
    arch = get_arch("smollm2-135m-instruct")
    numbers = arch.other_params() / arch.num_params()
    return judge(as_float(answer, "a fraction between 0 and 1"), share, rel=0.01,
                 why=f"{kept_bytes / 2**20:.0f} of {total / 2**20:.0f} MiB ({share:.0%}) sit in "
                     f"{len(kept)} unquantised tensors, {kept[0].dtype} — mostly the embedding: "
                     "that, not NF4, sets this model's size",
                 hint="sum numel() * element_size() over model_4bit.parameters() whose dtype is "
                      "not torch.uint8, then divide by footprint_bytes(model_4bit)",
                 mistakes=[(numbers, "that is a share of numbers (parameters); measure bytes: "
                                     "an fp32 number takes 8 times a 4-bit one"),
                           (1 - share, "that is the quantised (uint8) part; give the rest"),
                           (100 * share, "give a fraction (0.5), not a percentage")])


# ── 01 chat templates ─────────────────────────────────────────────────────────────────


LLAMA2_CHAT = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Hi!"},
               {"role": "assistant", "content": "Hello."}]


@exercise("01.1", "write Llama 2's rendering of a conversation by hand", given=LLAMA2_CHAT)
def _llama2_by_hand(answer: Any) -> Verdict:
    expected = get_template("llama2_chat").render(LLAMA2_CHAT)
    text = as_str(answer)
    if text == expected:
        return right("character for character what Llama 2 was trained on")
    if "<<SYS>>" not in text:
        return wrong("Llama 2 has no system turn: the system text goes inside the first "
                     "[INST], between <<SYS>> and <</SYS>>")
    i = next((k for k, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
             min(len(text), len(expected)))
    return wrong(f"the first difference is at character {i}: you have {text[i:i + 12]!r}, "
                 f"the template has {expected[i:i + 12]!r} (mind spaces and newlines)")


def _default_system_tokens() -> tuple[dict[str, int], dict[str, int]]:
    """({template: tokens of its default system turn}, the same in characters) for every named
    template that writes a system turn into a user-only conversation (bundled tokenizer)."""
    only_user = [{"role": "user", "content": "Hi"}]
    texts = {name: "".join(s.text for s in get_template(name).segments(only_user)
                           if s.role == "system") for name in list_templates()[1:]}
    tok = bundled_tokenizer()
    tokens = {n: len(tok(t, add_special_tokens=False)["input_ids"]) for n, t in texts.items() if t}
    return tokens, {n: len(texts[n]) for n in tokens}


@exercise("01.2", "measure: the tokens each named template's default system turn costs")
def _default_system(answer: Any) -> Verdict:
    truth, chars = _default_system_tokens()
    if not isinstance(answer, dict):
        raise Hint("give a dict {template name: number of tokens}, e.g. {'chatml': 12}")
    if answer == truth:
        worst = max(truth, key=truth.get)
        return right(f"{truth}: {worst} spends {truth[worst]} tokens of every sample on a "
                     "system turn nobody wrote, and none of it is trained")
    if "auto" in answer:
        return wrong("leave out 'auto': it is the tokenizer's own template, not a named one")
    if extra := sorted(set(answer) - set(truth)):
        return wrong(f"{extra[0]!r} adds no system turn when there is none; render "
                     "[{'role': 'user', 'content': 'Hi'}] with it and look at the segments")
    if missing := sorted(set(truth) - set(answer)):
        return wrong(f"{len(missing)} more template(s) write a system turn; look for segments "
                     "whose role is 'system' in each template's rendering")
    if answer == chars:
        return wrong("those are characters; tokenize the system text with the bundled "
                     "tokenizer (add_special_tokens=False) and count the ids")
    off = next(n for n in truth if answer[n] != truth[n])
    return wrong(f"{off}: count the tokens of all its 'system' segments joined into one "
                 "string, tokenized with add_special_tokens=False")


# ── 02 loss masking ───────────────────────────────────────────────────────────────────


TWO_TURNS = [{"role": "system", "content": "You are Pico, a tutor."},
             {"role": "user", "content": "What does LoRA train?"},
             {"role": "assistant", "content": "Two small matrices per layer."},
             {"role": "user", "content": "And the base weights?"},
             {"role": "assistant", "content": "They stay frozen."}]
PRETRAIN_TEXT = "LoRA trains two thin matrices and leaves the base frozen."


@exercise("02.1", "trained tokens of a two-turn conversation", given=TWO_TURNS)
def _trained_two_turns(answer: Any) -> Verdict:
    sample = encode(TWO_TURNS, bundled_tokenizer())
    n, total = _trained(sample["labels"]), len(sample["input_ids"])
    last = _trained(encode(TWO_TURNS, bundled_tokenizer(), train_on="last")["labels"])
    return judge(as_int(answer), n,
                 why=f"both answers and their <|im_end|> tokens: {n} of {total} tokens",
                 hint="encode the conversation and count the labels that are not -100",
                 mistakes=[(total, "you counted every token; only labels != -100 are trained"),
                           (total - n, "you counted the prompt tokens (labels == -100); "
                                       "count the trained ones"),
                           (n - 2, "you left out the <|im_end|> after each answer: it is "
                                   "trained, so the model learns to stop"),
                           (last, "that is only the last answer (train_on='last'); by "
                                  "default every assistant turn is trained")])


@exercise("02.2", "trained tokens of a pretraining sample", given=PRETRAIN_TEXT)
def _trained_pretraining(answer: Any) -> Verdict:
    sample = encode([{"role": "assistant", "content": PRETRAIN_TEXT}], bundled_tokenizer())
    n = _trained(sample["labels"])
    return judge(as_int(answer), n, why=f"every text token plus the closing EOS: {n}",
                 hint="a pretraining sample is [{'role': 'assistant', 'content': text}]; "
                      "encode it and count labels != -100",
                 mistakes=[(n - 1, "you forgot the EOS that closes the document: it is "
                                   "trained too"),
                           (0, "pretraining data has no prompt: every token is trained")])


def _losses(messages: list[dict[str, str]], train_on: str = "all") -> tuple[float, float]:
    """(mean loss over the trained tokens, mean loss over every token) of the bundled model."""
    import torch

    sample = encode(messages, bundled_tokenizer(), train_on=train_on)
    ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
    with torch.inference_mode():
        model = bundled_model()
        return model(input_ids=ids, labels=labels).loss.item(), \
            model(input_ids=ids, labels=ids).loss.item()


@exercise("02.3", "measure: the loss on the answers only vs on every token", given=TWO_TURNS)
def _answer_vs_all(answer: Any) -> Verdict:
    if isinstance(answer, (str, bytes)) or not hasattr(answer, "__len__") or len(answer) != 2:
        raise Hint("give two numbers: (loss on the answers only, loss on every token)")
    got = (as_float(answer[0], "a loss"), as_float(answer[1], "a loss"))
    answers, every = _losses(TWO_TURNS)
    last = _losses(TWO_TURNS, train_on="last")[0]

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-3 * abs(b)

    if near(got[0], answers) and near(got[1], every):
        side = "lower" if every < answers else "higher"
        return right(f"answers only {answers:.3f}, every token {every:.3f}: the prompt and the "
                     f"template make the all-token loss {side}, and training on them would spend "
                     "the gradient on text the model never has to write")
    if near(got[0], every) and near(got[1], answers):
        return wrong("the two are swapped: first the answers only (encode's labels), then "
                     "every token (labels = input_ids)")
    if near(got[0], last):
        return wrong("that answer loss counts only the last answer (train_on='last'); "
                     "encode()'s default trains both")
    if near(got[1], answers):
        return wrong("for every token pass labels=input_ids: no position is -100")
    which = "first" if not near(got[0], answers) else "second"
    return wrong(f"the {which} number is off: run model(input_ids=ids, labels=...) on the "
                 "encoded conversation, once with encode's labels and once with labels=ids")


# ── 03 custom dataset ─────────────────────────────────────────────────────────────────


MYSTERY_LINES = [
    '{"instruction": "Say one.", "output": "one"}',
    '{"instruction": "Say one.", "output": "one"}',
    '{"instruction": "Say three.", "output": "three"}',
    '{"instruction": "Say four.", "output": 4}',
    '{"instruction": "Say five.", "output": "five"}',
]


EVERYDAY = "everyday_qa.jsonl"  # in tutor/configs/data/


def _long_outliers(k: float) -> list[int]:
    report = quality_pass(DATA_DIR / EVERYDAY, bundled_tokenizer(), k=k)
    return sorted(int(where.rsplit(":", 1)[1]) for where, _ in report.long)


@exercise("03.1", "measure: the long token-length outliers of everyday_qa.jsonl", given=EVERYDAY)
def _outliers(answer: Any) -> Verdict:
    if isinstance(answer, (str, bytes)) or not hasattr(answer, "__iter__"):
        raise Hint("give a list of line numbers, e.g. [3, 17]")
    got = sorted(as_int(a, "a line number") for a in answer)
    expected, far = _long_outliers(1.5), _long_outliers(3.0)
    if got == expected:
        return right(f"lines {expected}: above Tukey's fence Q3 + 1.5·IQR of the token lengths; "
                     "read them — a long record is a question, not an error")
    if got == far and far != expected:
        return wrong("that is k = 3 (Tukey's 'far out' fence); the section uses k = 1.5")
    if got == [n - 1 for n in expected]:
        return wrong("line numbers count from 1, as the report's FILE:LINE")
    return wrong("run quality_pass on the file (k=1.5) and take the line numbers of report.long")


def _check_lines(lines: list[str]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mystery.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return check_file(path, bundled_tokenizer())


@exercise("03.2", "find the broken line with tutor data check", given=MYSTERY_LINES)
def _broken_line(answer: Any) -> Verdict:
    report = _check_lines(MYSTERY_LINES)
    line = int(report.errors[0].where.rsplit(":", 1)[1])
    warned = [int(p.where.rsplit(":", 1)[1]) for p in report.warnings]
    return judge(as_int(answer, "a line number"), line,
                 why=f"line {line}: {report.errors[0].message}",
                 hint="run tutor(['data', 'check', path]) and read the line that says error",
                 mistakes=[(line - 1, "line numbers count from 1, as the report's FILE:LINE"),
                           *((w, f"line {w} is only a warning (a duplicate); find the "
                                 "error") for w in warned)])


@exercise("03.3", "convert a CSV of your own and check it (answer: the .jsonl path)")
def _own_csv(answer: Any) -> Verdict:
    path = Path(answer) if isinstance(answer, (str, Path)) else None
    if path is None or not path.is_file():
        raise Hint("give the path of the .jsonl file that tutor data convert wrote")
    report = check_file(path, bundled_tokenizer())
    if report.format != "openai":
        return wrong(f"this file is in the '{report.format}' format: give the .jsonl that "
                     "`tutor data convert` wrote (openai messages), not the CSV")
    if report.errors:
        return wrong(f"the check reports an error: {report.errors[0]}")
    answers = [m["content"] for _, msgs in iter_conversations(path) for m in msgs
               if m["role"] == "assistant"]
    if report.conversations != 3:
        return wrong(f"{report.conversations} conversations; write exactly three rows")
    if not any("," in a for a in answers):
        return wrong("make one answer contain a comma, to see a quoted CSV field survive")
    return right("three conversations, a comma inside a quoted field, no errors")

