"""A small renderer of the Go text/template subset that Ollama TEMPLATEs here use.

Only for tests: it lets tests/test_export.py render the Modelfile's TEMPLATE the way
Ollama would and compare it byte for byte with `tutor.templates`. Supported:

- text; actions ``{{ ... }}`` with trim markers ``{{-`` / ``-}}`` (trim adjacent whitespace);
- ``.System``, ``.Role``, ``.Content`` (fields of the dot), ``$.Messages``, variables;
- ``if`` / ``else if`` / ``else`` / ``end``; ``range $i, $_ := PIPELINE``;
- ``$x := PIPELINE``; string literals; calls of ``eq``, ``ne``, ``not``, ``and``,
  ``or``, ``len``, ``slice`` with parenthesised arguments.

Anything else raises `ValueError` (so a TEMPLATE using more fails the test loudly).
Go's truthiness: "", 0, empty lists, None and False are false.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|:=|,|[$.\w]+')


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with trim markers applied to the texts."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int]:
    """Nodes until an action whose first word is in `stop`; returns (nodes, index of it)."""
    nodes: list = []
    while i < len(items):
        kind, body = items[i]
        word = body.split(" ", 1)[0] if kind == "action" else ""
        if kind == "action" and (word in stop or body.startswith("else")) and stop:
            return nodes, i
        if kind == "text":
            nodes.append(("text", body))
            i += 1
        elif word == "if":
            node, i = _parse_if(items, i)
            nodes.append(node)
        elif word == "range":
            var_part, _, pipe = body[len("range"):].partition(":=")
            body_nodes, j = _parse(items, i + 1, ("end",))
            nodes.append(("range", [v.strip() for v in var_part.split(",")], pipe.strip(),
                          body_nodes))
            i = j + 1
        else:
            nodes.append(("action", body))
            i += 1
    if stop:
        raise ValueError(f"missing {{{{ end }}}} (wanted one of {stop})")
    return nodes, i


def _parse_if(items: list[tuple[str, str]], i: int) -> tuple[tuple, int]:
    branches, cond = [], items[i][1][len("if"):].strip()
    i += 1
    while True:
        body, i = _parse(items, i, ("end",))
        branches.append((cond, body))
        head = items[i][1]
        if head == "end":
            return ("if", branches), i + 1
        if head.startswith("else if"):
            cond = head[len("else if"):].strip()
        elif head == "else":
            cond = None
        else:
            raise ValueError(f"unexpected {{{{ {head} }}}}")
        i += 1


def _truthy(v: Any) -> bool:
    return v not in (None, False, 0, "") and not (isinstance(v, (list, tuple)) and not v)


class _Eval:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def expr(self, tokens: list[str], dot: Any, env: dict[str, Any]) -> Any:
        """Evaluate a pipeline: a value, or a function applied to argument values."""
        args, i = [], 0
        while i < len(tokens):
            tok = tokens[i]
            if tok == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                    j += 1
                args.append(self.expr(tokens[i + 1:j - 1], dot, env))
                i = j
                continue
            args.append(self.atom(tok, dot, env))
            i += 1
        if isinstance(args[0], _Func):
            return args[0](*args[1:])
        if len(args) != 1:
            raise ValueError(f"cannot evaluate {tokens}")
        return args[0]

    def atom(self, tok: str, dot: Any, env: dict[str, Any]) -> Any:
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if tok.isdigit():
            return int(tok)
        if tok in _FUNCS:
            return _FUNCS[tok]
        if tok.startswith("$."):
            return self.root[tok[2:]]
        if tok.startswith("$"):
            return env[tok]
        if tok.startswith("."):
            return dot[tok[1:]]
        raise ValueError(f"unsupported token {tok!r}")

    def run(self, nodes: list, dot: Any, env: dict[str, Any], out: list[str]) -> None:
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "if":
                for cond, body in node[1]:
                    if cond is None or _truthy(self.expr(_TOKEN.findall(cond), dot, env)):
                        self.run(body, dot, env, out)
                        break
            elif node[0] == "range":
                names, pipe, body = node[1], node[2], node[3]
                for i, item in enumerate(self.expr(_TOKEN.findall(pipe), dot, env)):
                    scope = {**env, names[0]: i, names[-1]: item}
                    self.run(body, item, scope, out)
            else:
                tokens = _TOKEN.findall(node[1])
                if len(tokens) > 2 and tokens[1] == ":=":
                    env[tokens[0]] = self.expr(tokens[2:], dot, env)
                else:
                    out.append(str(self.expr(tokens, dot, env)))


class _Func:
    def __init__(self, f: Any) -> None:
        self.f = f

    def __call__(self, *args: Any) -> Any:
        return self.f(*args)


_FUNCS = {
    "eq": _Func(lambda a, b: a == b), "ne": _Func(lambda a, b: a != b),
    "not": _Func(lambda a: not _truthy(a)), "len": _Func(len),
    "and": _Func(lambda *a: next((x for x in a if not _truthy(x)), a[-1])),
    "or": _Func(lambda *a: next((x for x in a if _truthy(x)), a[-1])),
    "slice": _Func(lambda seq, start, *end: seq[start:end[0] if end else None]),  # Go: x[i:j]
}


def render(template: str, data: dict[str, Any]) -> str:
    """Render `template` with `data` (e.g. {"System": str, "Messages": [{"Role", "Content"}]})."""
    nodes, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _Eval(data).run(nodes, data, {}, out)
    return "".join(out)


def ollama_render(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """Render a chat as Ollama's server does: the Modelfile's SYSTEM is prepended as a
    system message when the chat does not start with one; ``.System`` is the system
    messages joined by blank lines, and ``.Messages`` keeps every message (system ones too)
    with ``Role``/``Content``."""
    msgs = list(messages)
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}, *msgs]
    systems = [m["content"] for m in msgs if m["role"] == "system"]
    turns = [{"Role": m["role"], "Content": m["content"]} for m in msgs]
    return render(template, {"System": "\n\n".join(systems), "Messages": turns})
