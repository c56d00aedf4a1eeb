"""Reading dataset files and turning each known record format into chat messages.

One representation for everything downstream: a conversation is a list of
``{"role": "system"|"user"|"assistant", "content": str}`` messages. This module reads
JSON (a list of records), JSONL (one record per line) and CSV (a header row), remembers
where every record came from (``file:line``), and converts one record at a time:

=========  =======================================================  ==========================
format     record                                                   becomes
=========  =======================================================  ==========================
openai     ``{"messages": [{"role", "content"}, ...]}``             the messages as they are
alpaca     ``{"instruction", "input"?, "output", "system"?}``       user = instruction[\\n input]
sharegpt   ``{"conversations": [{"from", "value"}, ...]}``          human→user, gpt→assistant
xtuner     ``{"conversation": [{"system"?, "input", "output"}]}``   per turn: system, user, asst.
qa         ``{"question", "answer", "system"?}``                    one user + one assistant turn
text       ``{"text"}``                                             ``[{"role": "assistant", ...}]``
=========  =======================================================  ==========================

The last row is incremental pretraining: plain text as a lone assistant message, which
`tutor.data.encode` trains in full with no template around it (an xtuner turn with an
empty input and no system becomes the same thing, as in XTuner's pretrain map).

Preference pairs (one prompt, a chosen and a rejected answer; TRL's standard and
conversational formats and a ``messages``/``conversations`` variant) are read by `to_pair` /
`iter_pairs` at the end of this module into three message lists.

Not handled: nested formats inside CSV cells (a CSV holds flat columns only), tool or
function-call messages, images, and files that do not fit in memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tutor.common import Message
from tutor.errors import TutorError
from tutor.templates import check_messages

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system"}
# Detection order matters: the first format whose keys a record has wins.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "openai": ("messages",),
    "sharegpt": ("conversations",),
    "xtuner": ("conversation",),
    "alpaca": ("instruction", "output"),
    "qa": ("question", "answer"),
    "text": ("text",),
}
FORMATS = tuple(FORMAT_KEYS)
SUFFIXES = (".jsonl", ".json", ".csv")


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """Name the format of one record from its keys; TutorError when none fits."""
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return name
    expected = " | ".join("+".join(keys) for keys in FORMAT_KEYS.values())
    raise TutorError(f"{where}: cannot tell the format from keys {sorted(record)}; "
                     f"expected one of: {expected}")


def _text(record: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else type(value).__name__
        raise TutorError(f"{where}: '{key}' must be a string ({got})")
    return value


def _list(record: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise TutorError(f"{where}: '{key}' must be a non-empty list of turns")
    return value


def _turn(item: Any, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise TutorError(f"{where}: expected an object with {'/'.join(keys)}, "
                         f"got {type(item).__name__}")
    return item


def _system(record: Mapping[str, Any], where: str) -> list[Message]:
    system = _text(record, "system", where, required=False)
    return [{"role": "system", "content": system}] if system else []


def to_messages(record: Mapping[str, Any], fmt: str, where: str) -> list[Message]:
    """Convert one record of format `fmt` into validated messages (see the table above)."""
    if not isinstance(record, Mapping):
        raise TutorError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = FORMAT_KEYS[fmt]
    missing = [k for k in keys if k not in record]
    if missing:
        raise TutorError(f"{where}: expected a '{fmt}' record with keys {', '.join(keys)}; "
                         f"missing {', '.join(missing)} (got {sorted(record)})")
    messages: list[Message]
    if fmt == "openai":
        messages = []
        for i, m in enumerate(_list(record, "messages", where)):
            m = _turn(m, ("role", "content"), f"{where}: message {i}")
            messages.append({"role": _text(m, "role", f"{where}: message {i}"),
                             "content": _text(m, "content", f"{where}: message {i}")})
    elif fmt == "sharegpt":
        messages = _system(record, where)
        for i, t in enumerate(_list(record, "conversations", where)):
            t = _turn(t, ("from", "value"), f"{where}: turn {i}")
            speaker = _text(t, "from", f"{where}: turn {i}")
            if speaker not in SHAREGPT_ROLES:
                raise TutorError(f"{where}: turn {i}: 'from' is '{speaker}'; expected one of "
                                 f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker],
                             "content": _text(t, "value", f"{where}: turn {i}")})
    elif fmt == "xtuner":
        messages = []
        for i, t in enumerate(_list(record, "conversation", where)):
            t = _turn(t, ("system", "input", "output"), f"{where}: turn {i}")
            messages += _system(t, f"{where}: turn {i}")
            user = _text(t, "input", f"{where}: turn {i}", required=False)
            messages += [{"role": "user", "content": user}] if user else []
            messages.append({"role": "assistant",
                             "content": _text(t, "output", f"{where}: turn {i}")})
    elif fmt == "alpaca":
        user = _text(record, "instruction", where)
        extra = _text(record, "input", where, required=False)
        user = f"{user}\n{extra}" if extra else user
        messages = _system(record, where) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record, "output", where)}]
    elif fmt == "qa":
        messages = _system(record, where) + [
            {"role": "user", "content": _text(record, "question", where)},
            {"role": "assistant", "content": _text(record, "answer", where)}]
    else:  # text: incremental pretraining
        text = _text(record, "text", where)
        if not text.strip():
            raise TutorError(f"{where}: 'text' is empty")
        messages = [{"role": "assistant", "content": text}]
    return validate_messages(messages, where)


def validate_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Check the conversation shape every later step relies on; return it as a list.

    The shape rules are `tutor.templates.check_messages` (non-empty list, known roles,
    string content, system only first); on top, a conversation needs at least one
    assistant message, otherwise nothing can be trained. Errors are prefixed by `where`.
    """
    try:
        messages = check_messages(messages, system_first=True)
    except TutorError as exc:
        raise TutorError(f"{where}: {exc}") from exc
    if not any(m["role"] == "assistant" for m in messages):
        raise TutorError(f"{where}: no assistant message, so nothing to train on")
    return messages


def read_records(path: str | Path, strict: bool = True) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", record)`` for every record of a .jsonl, .json or .csv file.

    UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" writes one) is read
    the same. Blank JSONL lines are skipped. For CSV the line is where the row starts (a quoted
    field may span several lines). With ``strict=False`` a broken JSONL line or CSV row
    is yielded as ``(where, TutorError)`` and reading goes on (a JSON array cannot be
    resynchronised after a syntax error, so it always raises).
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise TutorError(f"{path}: unsupported file type '{path.suffix}'; "
                         f"use {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise TutorError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drops a leading BOM
    except UnicodeDecodeError as exc:
        raise TutorError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix == ".jsonl":
        yield from _jsonl(text, path, strict)
    elif path.suffix == ".json":
        yield from _json_array(text, path)
    else:
        yield from _csv(text, path, strict)


def _jsonl(text: str, path: Path, strict: bool) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            error = TutorError(f"{path}:{n}: invalid JSON: {exc.msg} (column {exc.colno})")
            if strict:
                raise error from exc
            record = error
        yield f"{path}:{n}", record


def _json_array(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    """Walk a top-level JSON list element by element so each record keeps its line number."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    i = skip(0)
    if not text[i:i + 1] == "[":
        raise TutorError(f"{path}:1: a .json file must hold a list of records "
                         "(use .jsonl for one record per line)")
    i = skip(i + 1)
    while text[i:i + 1] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise TutorError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
        yield f"{path}:{line}", record
        i = skip(i)
        if text[i:i + 1] == ",":
            i = skip(i + 1)
        elif text[i:i + 1] != "]":
            line = text.count("\n", 0, i) + 1
            raise TutorError(f"{path}:{line}: invalid JSON: expected ',' or ']' between records")


def _csv(text: str, path: Path, strict: bool) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise TutorError(f"{path}:1: empty CSV; expected a header row such as question,answer")
    start = 2  # the header is line 1
    for row in reader:
        if None in row or None in row.values():
            row = TutorError(f"{path}:{start}: expected {len(reader.fieldnames)} columns "
                             f"({','.join(reader.fieldnames)}), got a different number")
            if strict:
                raise row
        yield f"{path}:{start}", row
        start = reader.line_num + 1


def iter_conversations(source: Any, format: str = "auto") -> Iterator[tuple[str, list[Message]]]:
    """Yield ``(where, messages)`` for a file path or a `datasets.Dataset`.

    With ``format="auto"`` the format is detected from the first record and every later
    record must match it (a mixed file fails on the first record that does not). A
    source without any record is a `TutorError` once it is read to the end.
    """
    if format != "auto" and format not in FORMATS:
        raise TutorError(f"unknown format '{format}'; use auto or one of {', '.join(FORMATS)}")
    fmt = None if format == "auto" else format
    empty = True
    for where, record in _records(source):
        empty = False
        if not isinstance(record, Mapping):
            raise TutorError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if fmt is None:
            fmt = detect_format(record, where)
        yield where, to_messages(record, fmt, where)
    if empty:
        name = source if isinstance(source, (str, Path)) else "the dataset"
        raise TutorError(f"{name}: no records")


def _records(source: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(source, (str, Path)):
        yield from read_records(source)
        return
    import datasets

    if isinstance(source, datasets.DatasetDict):
        raise TutorError(f"got a DatasetDict with splits {list(source)}; pass one split, "
                         "e.g. ds['train']")
    if not isinstance(source, datasets.Dataset):
        raise TutorError(f"expected a file path or a datasets.Dataset, not {type(source).__name__}")
    for i, row in enumerate(source):
        yield f"dataset row {i}", row


# ---------------------------------------------------------------- preference pairs
#
# A pair record holds one prompt and two answers to it:
#
#   {"prompt": str | [turns], "chosen": str | [turns], "rejected": str | [turns], "system"?}
#   {"messages" | "conversations": [turns], "chosen": ..., "rejected": ...}   (prompt = the
#                                                                              conversation)
#
# Turns are openai ({"role", "content"}) or ShareGPT ({"from", "value"}) objects; a string
# prompt is one user turn, a string answer one assistant turn (TRL's standard format; lists
# are TRL's conversational format). The prompt must end with a user turn; each answer is one
# or more assistant turns.

PAIRS_FORMAT = "pairs"  # the --format name of pair files (auto also detects them)
PAIR_KEYS = ("chosen", "rejected")
PAIR_PROMPT_KEYS = ("prompt", "messages", "conversations")  # first present wins
Pair = tuple[list[Message], list[Message], list[Message]]  # (prompt, chosen, rejected)


def is_pair_record(record: Any) -> bool:
    """True for a preference-pair record (it has both ``chosen`` and ``rejected``)."""
    return isinstance(record, Mapping) and all(k in record for k in PAIR_KEYS)


def _pair_turns(value: Any, key: str, role: str, where: str) -> list[Message]:
    """A string (one `role` turn) or a list of openai/ShareGPT turns, as messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    turns = _list({key: value}, key, where)
    messages: list[Message] = []
    for i, t in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        t = _turn(t, ("role", "content"), at)
        if "from" in t:
            speaker = _text(t, "from", at)
            if speaker not in SHAREGPT_ROLES:
                raise TutorError(f"{at}: 'from' is '{speaker}'; expected one of "
                                 f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": _text(t, "value", at)})
        else:
            messages.append({"role": _text(t, "role", at), "content": _text(t, "content", at)})
    return messages


def to_pair(record: Any, where: str) -> Pair:
    """One pair record → ``(prompt, chosen, rejected)`` message lists, validated: the prompt
    ends with a user turn, each answer holds assistant turns only. TutorError names `where`."""
    if not isinstance(record, Mapping):
        raise TutorError(f"{where}: expected a JSON object, got {type(record).__name__}")
    key = next((k for k in PAIR_PROMPT_KEYS if k in record), None)
    if key is None or not is_pair_record(record):
        raise TutorError(f"{where}: expected a preference pair with keys prompt (or messages/"
                         f"conversations), chosen, rejected (got {sorted(record)})")
    prompt = _system(record, where) + _pair_turns(record[key], key, "user", where)
    if prompt[-1]["role"] != "user":
        raise TutorError(f"{where}: the prompt must end with a user turn, "
                         f"not {prompt[-1]['role']}")
    chosen, rejected = (_pair_turns(record[k], k, "assistant", where) for k in PAIR_KEYS)
    for k, answer in zip(PAIR_KEYS, (chosen, rejected), strict=True):
        roles = {m["role"] for m in answer}
        if roles != {"assistant"}:
            raise TutorError(f"{where}: '{k}' must hold assistant turns only "
                             f"(got {', '.join(sorted(roles))})")
        validate_messages(prompt + answer, f"{where}: prompt + {k}")
    return prompt, chosen, rejected


def iter_pairs(source: Any) -> Iterator[tuple[str, Pair]]:
    """Yield ``(where, (prompt, chosen, rejected))`` for a file path or a `datasets.Dataset`
    of pair records (see above). The first bad record raises; an empty source too."""
    empty = True
    for where, record in _records(source):
        empty = False
        yield where, to_pair(record, where)
    if empty:
        name = source if isinstance(source, (str, Path)) else "the dataset"
        raise TutorError(f"{name}: no records")
