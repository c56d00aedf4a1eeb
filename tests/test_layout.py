"""The package's architecture, read from its code: two rooms, one-way imports, names defined once.

Imports are read from the AST (every ``import`` statement, also those inside functions, which
the package uses to stay fast to import), so a lazy import that closes a cycle counts too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tutor"
COURSE = "tutor.course"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (``from tutor.x import y`` may import
    the module tutor.x.y or the name y of tutor.x: both are looked up)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package uses absolute ones"
            base = node.module or ""
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m not in (name, "tutor")}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = 2
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """Control: the test above can fail (a lazy import closing a loop is a cycle too)."""
    graph = {"tutor.a": {"tutor.b"}, "tutor.b": {"tutor.c"}, "tutor.c": {"tutor.a"},
             "tutor.d": set()}
    assert find_cycle(graph) == ["tutor.a", "tutor.b", "tutor.c", "tutor.a"]
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tutor.course import lab\n", encoding="utf-8")
    assert imported("tutor.x", probe, {"tutor.course", "tutor.course.lab"}) == {
        "tutor.course", "tutor.course.lab"}


def test_the_toolkit_never_imports_the_course():
    graph = import_graph()
    toolkit = {m for m in graph if not m.startswith(COURSE)}
    leaks = {m: sorted(d for d in graph[m] if d.startswith(COURSE)) for m in toolkit}
    assert not {m: d for m, d in leaks.items() if d}
    assert any(d.startswith("tutor.") and not d.startswith(COURSE)
               for m in graph if m.startswith(COURSE) for d in graph[m])  # it builds on it


SHARED = {"IGNORE_INDEX", "Message", "Sample", "CONFIG_FILE", "atomic_write", "atomic_file",
          "no_progress_bars", "Verdict", "Exercise"}


def definitions(path: Path) -> set[str]:
    """Names a module defines at its top level (assignments, functions, classes)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_shared_name_is_defined_once():
    where: dict[str, list[str]] = {}
    for name, path in modules().items():
        for defined in definitions(path) & SHARED:
            where.setdefault(defined, []).append(name)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}
    assert set(where) == SHARED  # each is defined somewhere (a rename would hide here)


def literals(path: Path) -> list[tuple[int, object]]:
    """(line, value) of every constant in the code; -100 is the UnaryOp -(100)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant)):
            found.append((node.lineno, -node.operand.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


SHARED_VALUES = (-100, "tutor_config.yaml")  # IGNORE_INDEX and CONFIG_FILE of tutor.common


def test_no_bare_copies_of_the_shared_values():
    """-100 and "tutor_config.yaml" are written once, in tutor.common; everyone imports them."""
    copies = [f"{name}:{line}" for name, path in modules().items() if name != "tutor.common"
              for line, value in literals(path) if value in SHARED_VALUES]
    assert copies == []


def test_tests_and_benches_import_the_shared_values_too():
    """The same in tests/ and bench/ (this file names the values it looks for)."""
    root = PACKAGE.parent
    files = [p for d in ("tests", "bench") for p in sorted((root / d).rglob("*.py"))
             if p != Path(__file__).resolve()]
    copies = [f"{p.relative_to(root)}:{line}" for p in files
              for line, value in literals(p) if value in SHARED_VALUES]
    assert copies == []


def test_the_architecture_doc_lists_every_module():
    """docs/architecture.md's table names each module of the package once, and no other."""
    rows = re.findall(r"^\| `(tutor[\w.]*)` \|", ARCHITECTURE.read_text(encoding="utf-8"), re.M)
    assert len(rows) == len(set(rows)), "a module is listed twice"
    assert set(rows) == set(modules())
