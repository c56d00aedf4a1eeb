"""ChatSession, stop words, streaming, trimming, the widget, and `tutor chat` end to end
(one-shot, piped stdin, and a real terminal driven with pexpect)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_lora import tiny_base, train_checkpoint

from tutor.chat import ChatSession, GenerationSettings, StopWordFilter, ask, generate, reply
from tutor.errors import TutorError

TUTOR = [sys.executable, "-m", "tutor"]


def test_stop_word_filter_holds_back_a_forming_stop_word_and_cuts_it():
    got: list[str] = []
    f = StopWordFilter(["### Human:"], got.append)
    for piece in ["\nParis is ", "the capital.\n#", "## Hu", "man: next question"]:
        f.feed(piece)
    f.feed("", final=True)
    assert got == ["Paris is", " the capital."]  # whitespace waits: it may end the answer
    assert (f.text, f.stopped) == ("\nParis is the capital.\n", True)
    g: list[str] = []
    f = StopWordFilter(["### Human:"], g.append)
    f.feed("a #")
    f.feed("# b ", final=True)  # not a stop word after all: released at the end
    assert g == ["a", " ## b"] and not f.stopped


def test_settings_greedy_by_default_and_validated():
    assert GenerationSettings().generate_kwargs() == {"max_new_tokens": 256, "do_sample": False}
    assert GenerationSettings(prompt_lookup=10).generate_kwargs() == {
        "max_new_tokens": 256, "do_sample": False, "prompt_lookup_num_tokens": 10}
    kw = GenerationSettings(temperature=0.7, top_p=0.9, repetition_penalty=1.1).generate_kwargs()
    assert kw == {"max_new_tokens": 256, "repetition_penalty": 1.1, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.9}
    with pytest.raises(TutorError, match="0 < top_p <= 1"):
        GenerationSettings(top_p=0).generate_kwargs()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_base(tmp_path_factory.mktemp("tiny") / "base")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_history_is_trimmed_by_whole_turns_to_fit_the_window(tiny):
    model, tok = tiny
    s = ChatSession(model, tok, template="chatml", system="Be brief.",
                    settings=GenerationSettings(max_new_tokens=4), context_window=40)
    # The random model answers "\n\n\n\n" (stripped to ""), so each exchange adds 12
    # prompt tokens to the 18 of the first prompt: 18, 30, 42 > 40 - 4 = 36.
    for q in ["one", "two", "three"]:
        s.send(q)
    assert s.trimmed == 2 and [m["content"] for m in s.history[::2]] == ["two", "three"]
    ids = s.prompt_ids("four")  # 42 again: drops "two"
    assert (len(ids), s.trimmed) == (30, 4)
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nthree<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nfour<|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(TutorError, match=r"needs \d+ prompt tokens but only 36 fit"):
        s.prompt_ids("word " * 80)
    s.reset()
    assert (s.history, s.trimmed, s.system) == ([], 0, "Be brief.")


def test_widget_degrades_to_a_function_call(tiny):
    from tutor.course.chat_widget import ChatWidget

    model, tok = tiny
    w = ChatWidget(ChatSession(model, tok, template="chatml",
                               settings=GenerationSettings(max_new_tokens=3)))
    answer = w.send("hello")
    assert w.session.history == [{"role": "user", "content": "hello"},
                                 {"role": "assistant", "content": answer}]
    assert w.transcript() == f"user: hello\nassistant: {answer}"
    bundle = w._repr_mimebundle_()
    assert bundle["text/plain"] == w.transcript()
    assert "<b>user</b>: hello" in w.history.value
    w.text.value = "again"  # what pressing Enter in the live widget does
    assert [m["content"] for m in w.session.history[::2]] == ["hello", "again"]
    assert w.text.value == ""


@pytest.mark.slow
def test_bundled_session_streams_and_remembers(bundled):
    model, tok = bundled
    assert ask(model, tok, "What is the capital of France?") == "The capital of France is Paris."
    s = ChatSession(model, tok, settings=GenerationSettings(max_new_tokens=24))
    pieces: list[str] = []
    first = s.send("What is the capital of France?", on_text=pieces.append)
    assert first == "The capital of France is Paris." == "".join(pieces).strip()
    assert s.last.stopped_by == "eos" and s.last.new_tokens == 8
    second = s.send("And of Italy?")
    assert "Rome" in second
    assert reply(model, tok, s.messages()[:2] + [{"role": "user", "content": "And of Italy?"}],
                 max_new_tokens=24) == second
    # Prompt lookup verifies guessed tokens in one pass; in fp32 greedy output is the
    # same as one token per step.
    fast = ChatSession(model, tok, settings=GenerationSettings(max_new_tokens=24, prompt_lookup=10))
    assert fast.send("What is the capital of France?") == first
    # A stop word of several tokens stops generate itself (stop_strings), not only the text.
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                     "<|im_start|>assistant\n", add_special_tokens=False)
    g = generate(model, tok, ids, GenerationSettings(max_new_tokens=30), ["France is"])
    assert (g.text, g.new_tokens, g.stopped_by) == ("The capital of", 5, "stop word")


@pytest.mark.slow
def test_end_to_end_train_convert_merge_chat(bundled, tmp_path):
    """Bundled model → 3 LoRA steps → convert → merge → `tutor chat --prompt` answers,
    and the merged model alone answers exactly like base + adapter."""
    from peft import PeftModel

    from tutor.merge import convert_checkpoint, merge, probe_logits
    from tutor.models import ensure_bundled

    base_dir = ensure_bundled()
    checkpoint = train_checkpoint(base_dir, tmp_path / "run", steps=3, lr=1e-2,
                                  model_name="smollm2-135m-instruct")
    adapter = convert_checkpoint(checkpoint, tmp_path / "adapter")
    report = merge("smollm2-135m-instruct", adapter, tmp_path / "merged")
    assert report.max_abs_diff <= 1e-3 and report.template == "chatml"
    assert report.merged_bytes > 100 * report.adapter_bytes

    question = "What is the capital of France?"
    model, tok = bundled
    with_adapter = PeftModel.from_pretrained(model, str(adapter)).eval()
    try:
        expected = ask(with_adapter, tok, question, template="chatml")
        with with_adapter.disable_adapter():  # the LoRA layers live inside `model` now
            base_logits = probe_logits(with_adapter, tok)
        moved = (probe_logits(with_adapter, tok) - base_logits).abs().max()
    finally:
        with_adapter.unload()  # give the shared fixture its plain weights back
    assert moved > 100 * report.max_abs_diff  # 3 steps changed the model far beyond rounding
    out = subprocess.run([*TUTOR, "chat", str(tmp_path / "merged"), "--prompt", question,
                          "--max-new-tokens", "64", "--no-streamer"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    piped = subprocess.run([*TUTOR, "chat", "smollm2-135m-instruct", "--adapter", str(adapter),
                            "--max-new-tokens", "64"], input=question + "\n",
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == expected + "\n"


@pytest.mark.slow
def test_chat_in_a_real_terminal():
    """Multi-turn (history grows the prompt), /reset (it shrinks back), /system, EOF."""
    import pexpect

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "tutor", "chat", "smollm2-135m-instruct",
                                           "--max-new-tokens", "24", "--verbose"],
                          env=env, encoding="utf-8", timeout=240)
    stats = re.compile(r"\[(\d+) tokens in [\d.]+ s = [\d.]+ tok/s; prompt (\d+) tokens")
    child.expect(r"/exit \(or Ctrl-D\)")
    child.expect(">>> ")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect(stats)
    new1, prompt1 = int(child.match[1]), int(child.match[2])
    child.expect(">>> ")
    child.sendline("And of Italy?")
    child.expect(stats)
    prompt2 = int(child.match[2])
    assert prompt2 > prompt1 + new1  # the first exchange is in the prompt
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\[conversation cleared\]")
    child.sendline("What is the capital of France?")
    child.expect(stats)
    assert int(child.match[2]) == prompt1  # history really gone
    child.expect(">>> ")
    child.sendline("/system You are a pirate.")
    child.expect(r"\[system prompt set\]")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_with_empty_stdin_is_a_one_line_error(tmp_path):
    out = subprocess.run([*TUTOR, "chat", str(tmp_path / "nope")], input="",
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith(f"tutor: error: no model directory at {tmp_path / 'nope'}")


def test_sampling_options_reach_generate(tiny):
    """top_p so small that only the most likely token is kept samples the greedy answer;
    a hot temperature with top_p 1 samples other answers; a repetition penalty changes
    the greedy answer of a model that repeats itself (the random tiny model does)."""
    import torch

    model, tok = tiny
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)

    def run(seed: int, **kw) -> list[int]:
        torch.manual_seed(seed)
        settings = GenerationSettings(max_new_tokens=12, **kw)
        return tok.encode(generate(model, tok, ids, settings).text, add_special_tokens=False)

    greedy = run(0)
    assert [run(s, temperature=1.0, top_p=1e-6) for s in (1, 2)] == [greedy, greedy]
    hot = {tuple(run(s, temperature=5.0)) for s in range(4)}
    assert len(hot) > 1 and tuple(greedy) not in hot
    assert run(0, repetition_penalty=5.0) != greedy


def test_chat_flags_build_the_generation_settings(monkeypatch):
    from tutor.chat import load, repl
    from tutor.cli import main

    seen = {}
    monkeypatch.setattr(load, "open_session", lambda model, **kw: seen.update(kw) or 1)
    monkeypatch.setattr(repl, "run_chat", lambda *a, **kw: 0)
    assert main(["chat", "m", "--temperature", "0.7", "--top-p", "0.9",
                 "--repetition-penalty", "1.3", "--system", "Be brief."]) == 0
    assert seen["settings"] == GenerationSettings(temperature=0.7, top_p=0.9,
                                                  repetition_penalty=1.3)
    assert seen["system"] == "Be brief."


@pytest.mark.parametrize("bad", [["--bits", "3"], ["--temperature", "x"]])
def test_chat_rejects_bad_flags(bad):
    out = subprocess.run([*TUTOR, "chat", "m", *bad], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid" in out.stderr


def wait_until_reading(pid: int, timeout: float = 120.0) -> None:
    """Return once the main thread of `pid` sleeps in select/poll, i.e. readline waits for
    a key. Linux: the kernel names where a sleeping thread waits in /proc/PID/wchan."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        if "poll" in wchan or "select" in wchan:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never waited for input (wchan: {wchan!r})")


def test_ctrl_c_at_the_prompt_ends_the_chat_cleanly(tmp_path):
    import pexpect

    base = tiny_base(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "tutor", "chat", str(base)], env=env,
                          encoding="utf-8", timeout=120)
    child.expect(r"tutor chat \(auto template\)")
    child.expect(">>> ")
    child.sendline("/nonsense")
    child.expect(r"\[unknown command /nonsense; commands: /reset")
    child.expect(">>> ")
    # The prompt is written before readline blocks in select(); a Ctrl-C that lands in
    # between is handled only at the next keypress (CPython's readline). A person never
    # types that fast; on a loaded CI machine the test did. Wait until it reads.
    wait_until_reading(child.pid)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before
