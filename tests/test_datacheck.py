"""`tutor data convert|check|show`: exit codes, line numbers, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tutor.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tutor" / "configs" / "data"  # the project's datasets, shipped with the package
DATA_FILES = sorted(p for p in DATA.iterdir() if p.suffix in (".jsonl", ".csv"))


def test_data_files_are_there():
    assert [p.name for p in DATA_FILES] == [
        "assistant.jsonl", "assistant_heldout.jsonl", "everyday_qa.jsonl", "general_probe.jsonl",
        "geography_qa.jsonl", "pico_pairs.jsonl", "pico_pairs_heldout.jsonl",
        "pretrain_corpus.jsonl", "raw_qa.csv"]


@pytest.mark.parametrize("path", DATA_FILES, ids=[p.name for p in DATA_FILES])
def test_check_passes_on_every_bundled_file(path, capsys):
    assert main(["data", "check", str(path), "--max-length", "512"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: format " in out and " 0 errors, 0 warnings" in out
    assert "token lengths:" in out


def test_check_names_the_broken_line(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [json.dumps(good), '{"messages": [', json.dumps({"text": "x"}), json.dumps(good),
             json.dumps({"messages": [{"role": "user", "content": "long " * 80},
                                      {"role": "assistant", "content": "a"}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "\n\n- a list"}]})]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(path), "--max-length", "64"]) == 1
    out = capsys.readouterr().out
    assert f"{path}: format openai, 6 records, 4 conversations ok, 3 errors, 3 warnings" in out
    assert f"{path}:2: error: invalid JSON: Expecting value" in out
    assert f"{path}:3: error: expected a 'openai' record with keys messages" in out
    assert f"{path}:4: warning: duplicate of {path}:1" in out
    assert f"{path}:5: warning: truncated from " in out
    assert f"{path}:5: error: no trainable token left after truncation to 64 tokens" in out
    assert f"{path}:6: warning: 1 token(s) merge template text with answer text" in out


def test_convert_csv_to_messages_jsonl(tmp_path, capsys):
    out = tmp_path / "sub" / "qa.jsonl"
    assert main(["data", "convert", str(DATA / "raw_qa.csv"), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 32 conversations to {out}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 32 and rows[0] == {"messages": [
        {"role": "user", "content": "What is a token?"},
        {"role": "assistant", "content": "A token is a piece of text, often part of a word, "
                                         "that the model reads as one integer id."}]}
    assert sorted(p.name for p in out.parent.iterdir()) == ["qa.jsonl"]  # no temp left
    assert main(["data", "check", str(out)]) == 0


def test_convert_failure_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\nonly-one-column\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(bad), str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tutor: error: {bad}:3: expected 2 columns (question,answer), got a different number")
    assert list(tmp_path.iterdir()) == [bad]
    assert main(["data", "convert", str(DATA / "raw_qa.csv"), str(tmp_path / "x.txt")]) == 2
    assert "the output must be a .jsonl file" in capsys.readouterr().err


def test_show_prints_n_samples(capsys):
    assert main(["data", "show", str(DATA / "geography_qa.jsonl"), "-n", "2",
                 "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("── ") == 2
    assert "⟦The capital of France is Paris.<|im_end|>⟧⏎" in out
    assert main(["data", "show", str(DATA / "geography_qa.jsonl"), "-n", "1", "--template",
                 "chatml", "--color", "always"]) == 0
    assert "\x1b[30;42mThe\x1b[0m" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["show", "check"])
def test_unknown_template_is_one_line(action, capsys):
    assert main(["data", action, str(DATA / "raw_qa.csv"), "--template", "chatmlx"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "unknown chat template 'chatmlx'; did you mean chatml" in err[0]
    assert "raw_qa.csv:" not in captured.out


def test_quality_pass_finds_each_kind_by_line(tmp_path):
    """tutor.datacheck.quality_pass on a planted file: every finding with its file:line."""
    from transformers import AutoTokenizer

    from tutor.datacheck import normalise, quality_pass, tukey_fences
    from tutor.models import resolve

    def qa(q: str, a: str) -> str:
        return json.dumps({"question": q, "answer": a})

    lines = [qa(f"What is item {w}?", f"Item {w} is a word we use in tests, nothing more.")
             for w in "123456"]
    lines += [lines[0],                                                    # 7: exact copy of 1
              qa("what is  ITEM 2", "item 2 is a word we use in tests nothing more"),  # 8: ~2
              qa("What is item 3?", "Item 3 is a word we use in tests, nothing less."),  # 9: 3
              qa("What is item 7?", "Yes."),                               # 10: short answer
              qa("What is item 8?", "Item 8 " * 120)]                      # 11: long outlier
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = quality_pass(path, AutoTokenizer.from_pretrained(resolve()))
    at = f"{path}:"
    assert report.exact == [(at + "7", at + "1")]
    assert report.near == [(at + "8", at + "2")]
    assert report.same_question == [(at + "9", at + "3")]
    assert report.short_answers == [(at + "10", 2)]  # "Yes." is two tokens: "Yes" "."
    assert [w for w, _ in report.long] == [at + "11"]
    assert at + "10" in dict(report.short_length)  # the one-word answer is short in tokens too
    low, high = report.fences
    assert all(n < low for _, n in report.short_length) and all(n > high for _, n in report.long)
    assert report.fences == tukey_fences(list(report.lengths.values()))
    assert normalise("What's  LoRA?") == "what s lora"
    assert tukey_fences([1, 2, 3, 4, 5]) == (-1.0, 7.0)  # Q1 2, Q3 4, IQR 2


def pair_file(tmp_path: Path) -> Path:
    ok = {"prompt": "Who made you?", "chosen": "The Tutor Lab.", "rejected": "OpenAI."}
    lines = [ok, ok | {"rejected": "The Tutor Lab."}, ok | {"chosen": " "},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                              "content": "Hello."}],
              "chosen": "x", "rejected": "y"},
             ok | {"rejected": "OpenAI, " * 40}, ok, ok | {"chosen": "  Tutor Lab."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_check_pairs_names_each_problem_with_its_line(tmp_path, capsys):
    path = pair_file(tmp_path)
    assert main(["data", "check", str(path), "--max-length", "64"]) == 1
    out = capsys.readouterr().out
    assert f"{path}: format pairs, 7 records, 3 pairs ok, 4 errors, 2 warnings" in out
    assert f"{path}:2: error: chosen and rejected are the same tokens" in out
    assert f"{path}:3: error: 'chosen' is empty" in out
    assert f"{path}:4: error: the prompt must end with a user turn, not assistant" in out
    assert f"{path}:5: warning: 157 tokens on one side, past max_length=64: it would be " \
           "dropped" in out
    assert f"{path}:6: warning: duplicate of {path}:1" in out
    assert f"{path}:7: error: chosen: the prompt's 34 tokens are not a prefix" in out
    assert "max_length 64: 1 dropped" in out


def test_show_pairs_prints_the_prompt_once_and_both_answers(capsys):
    assert main(["data", "show", str(DATA / "pico_pairs.jsonl"), "-n", "1",
                 "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("How long ago did I start this chat?") == 1
    assert "── chosen: 21 more tokens, 19 trained ──\n⏎\n⟦I can't measure time, so I don't know " \
           "how long this chat has lasted.<|im_end|>⟧⏎\n" in out
    assert "── rejected: 12 more tokens, 10 trained ──\n⏎\n⟦You started this chat about twelve " \
           "minutes ago.<|im_end|>⟧⏎\n" in out


def test_convert_pairs_writes_message_lists(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}],
                               "chosen": "Hello.", "rejected": [{"role": "assistant",
                                                                 "content": "Go."}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 pairs to {out}"
    assert json.loads(out.read_text()) == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go."}]}
    assert main(["data", "convert", str(out), str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()  # a fixed point
