"""Reading dataset files: every format, auto-detection, and every bad-input path (file:line)."""

from __future__ import annotations

import json

import datasets
import pytest

from tutor.data import load_conversations
from tutor.errors import TutorError
from tutor.formats import iter_conversations

QA = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


RECORDS = {
    "openai": ({"messages": QA}, QA),
    "alpaca": ({"instruction": "Name it.", "input": "Japan", "output": "Tokyo.", "system": "S"},
               [{"role": "system", "content": "S"},
                {"role": "user", "content": "Name it.\nJapan"},
                {"role": "assistant", "content": "Tokyo."}]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "S"},
                                    {"from": "human", "value": "Q?"},
                                    {"from": "gpt", "value": "A."}]},
                 [{"role": "system", "content": "S"}, *QA]),
    "xtuner": ({"conversation": [{"system": "S", "input": "Q?", "output": "A."},
                                 {"input": "Q2", "output": "A2"}]},
               [{"role": "system", "content": "S"}, *QA,
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]),
    "qa": ({"question": "Q?", "answer": "A.", "expected": ["ignored"]}, QA),
    "text": ({"text": "Plain text."}, [{"role": "assistant", "content": "Plain text."}]),
}


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_from_jsonl_auto_and_named(tmp_path, fmt):
    record, expected = RECORDS[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [record, record])
    assert load_conversations(path)["messages"] == [expected, expected]
    assert load_conversations(path, format=fmt)["messages"] == [expected, expected]


def test_alpaca_without_input_and_xtuner_pretraining_turn(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Yo"}])
    assert load_conversations(path)["messages"] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    path = write_jsonl(tmp_path / "x.jsonl", [{"conversation": [{"input": "", "output": "T"}]}])
    assert load_conversations(path)["messages"] == [[{"role": "assistant", "content": "T"}]]


def test_json_array_and_csv_and_dataset(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"messages": QA}, {"messages": QA}], indent=2))
    assert load_conversations(tmp_path / "d.json")["messages"] == [QA, QA]
    (tmp_path / "d.csv").write_text(
        'question,answer\nQ?,A.\n"multi\nline, with comma","say ""hi"""\n')
    assert load_conversations(tmp_path / "d.csv")["messages"] == [QA, [
        {"role": "user", "content": "multi\nline, with comma"},
        {"role": "assistant", "content": 'say "hi"'}]]
    ds = datasets.Dataset.from_list([{"instruction": "Hi", "input": "", "output": "Yo"}])
    out = load_conversations(ds)
    assert out.column_names == ["messages"]
    assert out["messages"] == [[{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Yo"}]]


def test_where_names_lines_in_json_and_csv(tmp_path):
    (tmp_path / "d.json").write_text('[\n  {"messages": []},\n  {"x": 1}\n]')
    assert [w for w, _ in _records_where(tmp_path / "d.json")] == [f"{tmp_path}/d.json:2",
                                                                   f"{tmp_path}/d.json:3"]
    (tmp_path / "d.csv").write_text('question,answer\n"a\nb",c\nd,e\n')
    assert [w for w, _ in _records_where(tmp_path / "d.csv")] == [f"{tmp_path}/d.csv:2",
                                                                  f"{tmp_path}/d.csv:4"]


def _records_where(path):
    from tutor.formats import read_records

    return list(read_records(path))


BAD_JSONL = [
    ('{"messages": [}', "invalid JSON: Expecting value (column 15)"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"foo": 1}', "cannot tell the format from keys ['foo']; expected one of: messages | "
                   "conversations | conversation | instruction+output | question+answer | text"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list of turns"),
    ('{"messages": []}', "'messages' must be a non-empty list of turns"),
    ('{"messages": ["hi"]}', "message 0: expected an object with role/content, got str"),
    ('{"messages": [{"role": "user"}]}', "message 0: 'content' must be a string (missing)"),
    ('{"messages": [{"role": "user", "content": 3}]}',
     "message 0: 'content' must be a string (int)"),
    ('{"messages": [{"role": "bot", "content": "x"}]}',
     "message 0: role 'bot' is not one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}',
     "no assistant message, so nothing to train on"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "a"}]}',
     "message 1: a system message is only allowed first"),
    ('{"conversations": [{"from": "robot", "value": "x"}]}',
     "turn 0: 'from' is 'robot'; expected one of human, user, gpt, assistant, system"),
    ('{"conversation": [{"input": "q"}]}', "turn 0: 'output' must be a string (missing)"),
    ('{"instruction": 1, "output": "o"}', "'instruction' must be a string (int)"),
    ('{"text": "   "}', "'text' is empty"),
]


@pytest.mark.parametrize(("line", "message"), BAD_JSONL)
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n" + line + "\n")  # line 1 blank: the record is on line 2
    with pytest.raises(TutorError) as err:
        load_conversations(path)
    assert str(err.value) == f"{path}:2: {message}"


def test_mixed_formats_fail_on_the_first_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": QA}, {"question": "q", "answer": "a"}])
    with pytest.raises(TutorError, match=r"m\.jsonl:2: expected a 'openai' record with keys "
                                         r"messages; missing messages"):
        load_conversations(path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.txt", "x", "unsupported file type '.txt'; use .jsonl, .json, .csv"),
    ("d.json", '{"messages": []}', "1: a .json file must hold a list of records"),
    ("d.json", '[{"text": "a"} {"text": "b"}]', "1: invalid JSON: expected ',' or ']'"),
    ("d.json", '[\n{"text": "a"},\n{"text": }]', "3: invalid JSON: Expecting value"),
    ("d.csv", "", "1: empty CSV; expected a header row"),
    ("d.csv", "question,answer\na,b,c\n", "2: expected 2 columns (question,answer)"),
    ("d.csv", "question,answer\na\n", "2: expected 2 columns (question,answer)"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TutorError) as err:
        load_conversations(path)
    sep = ": " if message.startswith("unsupported") else ":"
    assert str(err.value).startswith(f"{path}{sep}{message}")


def test_missing_file_non_utf8_and_wrong_sources(tmp_path):
    with pytest.raises(TutorError, match="nope.jsonl: no such file"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(TutorError, match=r"latin\.jsonl: not UTF-8 text"):
        load_conversations(tmp_path / "latin.jsonl")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])})
    with pytest.raises(TutorError, match=r"DatasetDict with splits \['train'\]; pass one split"):
        load_conversations(dd)
    with pytest.raises(TutorError, match="expected a file path or a datasets.Dataset, not list"):
        load_conversations([{"text": "a"}])
    with pytest.raises(TutorError, match="unknown format 'yaml'; use auto or one of openai"):
        load_conversations(tmp_path / "x.jsonl", format="yaml")


def test_dataset_rows_are_named(tmp_path):
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a"}, {"question": "q",
                                                                        "answer": None}])
    with pytest.raises(TutorError, match=r"^dataset row 1: 'answer' must be a string"):
        load_conversations(ds)


def test_non_strict_reading_yields_errors_and_goes_on(tmp_path):
    from tutor.formats import read_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\nnot json\n{"text": "b"}\n')
    got = list(read_records(path, strict=False))
    assert [w.rsplit(":", 1)[1] for w, _ in got] == ["1", "2", "3"]
    assert isinstance(got[1][1], TutorError) and got[2][1] == {"text": "b"}
    with pytest.raises(TutorError, match=r"d\.jsonl:2: invalid JSON"):  # strict by default
        list(iter_conversations(path))
