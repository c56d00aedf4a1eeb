"""The README and the pages of docs/ are executed, so they cannot drift from the code.

Every fenced block is preceded by a visible marker (an HTML comment) saying how it is checked:

    <!-- readme: run -->                  run as written: bash with `tutor` → `python -m tutor`,
                                          python as a script (`# → text` lines must be printed)
    <!-- readme: run-with KEY=VALUE ... --> run, with `--set KEY=VALUE` appended to each
                                          `tutor train` / `tutor demo` line (shorter training)
    <!-- readme: parse -->                GPU / multi-GPU / long commands: each line is checked
                                          (`check_line`), not run
    <!-- readme: show -->                 not code (a directory tree); not allowed on shell/python
    <!-- readme: table FILE -->           the Markdown table after it equals FILE's table

A block without a marker fails. `<!-- readme: cli-table -->` marks the command reference: one
row per sub-command, purpose = its argparse help, an example that passes `check_line`. Run and
parse blocks are taken in order (README.md, then docs/*.md by name) in one temporary directory
holding a copy of data/, so later blocks see what earlier ones wrote and nothing is written into
the repository. `tools/doc_tables.py` writes the marked tables from their files.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tutor.cli import build_parser
from tutor.models import BUNDLED
from tutor.templates import list_templates
from tutor.train_config import deepspeed_json, list_recipes, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # in the order they run
README_MAX_LINES = 250  # what a newcomer reads first; details are one link away in docs/
MARKER = re.compile(r"^<!-- readme: ([\w-]+)(.*?) -->$")
CODE = {"bash", "sh", "shell", "console", "python"}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence in `doc`
    lang: str
    marker: str | None
    arg: str
    code: str
    doc: str = "README.md"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(text: str = README, doc: str = "README.md") -> list[Block]:
    """Every fenced block with the marker on the line before it (if any)."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            m = MARKER.match(lines[i - 1].strip()) if i else None
            found.append(Block(i + 1, lines[i][3:].strip(), m and m.group(1),
                               (m.group(2).strip() if m else ""), "\n".join(lines[i + 1:end]),
                               doc))
            i = end
        i += 1
    return found


def all_blocks() -> list[Block]:
    """The blocks of the README, then of each page of docs/, in the order they run."""
    return [b for path in DOCS
            for b in blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]


def markdown_table(text: str, starts: str) -> list[str]:
    """The lines of the first Markdown table at or after the first line starting with `starts`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(starts))
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows


# ---------------------------------------------------------------- checking commands


@dataclass
class World:
    """What exists for path checks: files under `cwd`, plus what earlier commands write."""

    cwd: Path
    produced: set[str] = field(default_factory=set)
    copies: dict[str, str] = field(default_factory=dict)  # copy-cfg DEST → recipe name

    def path_ok(self, p: str) -> bool:
        p = p.rstrip("/")
        return (self.cwd / p).exists() or any(p == q or p.startswith(q + "/")
                                              for q in self.produced)

    def model_ok(self, m: str) -> bool:
        recipe_models = {load_config(r).model for r in list_recipes()}
        return m in BUNDLED or m in recipe_models or self.path_ok(m)


def _parse(args: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"`tutor {shlex.join(args)}` does not parse") from exc


def check_tutor(args: list[str], world: World) -> None:
    """Parse `tutor ARGS` with the real parser and check what it names exists."""
    ns, line = _parse(args), shlex.join(args)
    cmd = f"{ns.command} {getattr(ns, 'data_command', '')}".strip()

    def need(ok: bool, what: str) -> None:
        assert ok, f"`tutor {line}`: {what}"

    if cmd in ("data convert", "data check", "data show"):
        src = ns.input if cmd == "data convert" else ns.file
        need(world.path_ok(src), f"no file {src}")
        if cmd == "data convert":
            world.produced.add(ns.out)
    elif cmd == "copy-cfg":
        need(ns.name in list_recipes(), f"no recipe {ns.name}")
        world.copies[ns.dest] = ns.name
        world.produced.add(ns.dest)
    elif cmd in ("train", "demo"):
        config = "smollm2_135m_qlora_assistant" if cmd == "demo" else ns.config
        source = world.copies.get(config, config)
        need(source in list_recipes() or world.path_ok(source), f"no recipe {config}")
        cfg = load_config(source if source in list_recipes() else world.cwd / source, ns.set)
        if cmd == "train" and ns.deepspeed:
            deepspeed_json(ns.deepspeed)
        need(cmd == "demo" or ns.resume or ns.overwrite or cfg.output_dir not in world.produced,
             f"output_dir {cfg.output_dir} holds an earlier run: tutor refuses it without "
             "--resume or --overwrite")
        world.produced.add(ns.out if cmd == "demo" else cfg.output_dir)
    elif cmd == "convert":
        need(world.path_ok(ns.checkpoint), f"no checkpoint {ns.checkpoint}")
        world.produced.add(ns.out)
    elif cmd == "merge":
        need(world.model_ok(ns.base), f"unknown base model {ns.base}")
        need(world.path_ok(ns.adapter), f"no adapter {ns.adapter}")
        world.produced.add(ns.out)
    elif cmd == "export":
        need(world.model_ok(ns.model), f"unknown model {ns.model}")
        need(ns.adapter is None or world.path_ok(ns.adapter), f"no adapter {ns.adapter}")
        world.produced.add(ns.out)
    elif cmd == "chat":
        need(world.model_ok(ns.model), f"unknown model {ns.model}")
        need(ns.adapter is None or world.path_ok(ns.adapter), f"no adapter {ns.adapter}")
        need(ns.prompt_template in (None, "auto", *list_templates()),
             f"unknown template {ns.prompt_template}")
    elif cmd == "eval":
        need(world.model_ok(ns.model), f"unknown model {ns.model}")
        need(ns.adapter is None or world.path_ok(ns.adapter), f"no adapter {ns.adapter}")
        for f in ns.files:  # as written, else a shipped dataset (as tutor eval resolves it)
            need(world.path_ok(f) or (ROOT / "tutor" / "configs" / f).is_file(), f"no file {f}")
    elif cmd == "memory":
        from tutor.memory import get_arch

        get_arch(ns.model)
    elif cmd == "lab" and ns.lab_command == "check":
        # the course's notebooks are in the repository, not in the run blocks' temp dir
        need(world.path_ok(ns.notebook) or (ROOT / ns.notebook).is_file(),
             f"no notebook {ns.notebook}")


def makefile() -> tuple[set[str], set[str]]:
    text = (ROOT / "Makefile").read_text()
    return (set(re.findall(r"^([\w-]+):", text, re.M)),
            set(re.findall(r"^(\w+)\s*\?=", text, re.M)))


def check_line(line: str, world: World) -> None:
    """One line of a parse block: tutor / torchrun -m tutor / make / pip install -e .[extra]."""
    words = shlex.split(line, comments=True)
    if not words:
        return
    if words[0] == "tutor":
        return check_tutor(words[1:], world)
    if words[0] == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "tutor":
        assert any(w.startswith("--nproc_per_node") for w in words), line
        return check_tutor(words[words.index("-m") + 2:], world)
    if words[0] == "make":
        targets, variables = makefile()
        for w in words[1:]:
            name, is_var, _ = w.partition("=")
            assert (name in variables) if is_var else (name in targets), f"{line}: {name}?"
        return None
    if words[:3] == [".venv/bin/pip", "install", "-e"]:
        section = (ROOT / "pyproject.toml").read_text().split(
            "[project.optional-dependencies]")[1].split("\n[")[0]
        extras = re.findall(r"^(\w+)\s*=", section, re.M)
        wanted = re.fullmatch(r"\.\[([\w,]+)\]", words[3])
        assert wanted and set(wanted.group(1).split(",")) <= set(extras), line
        return None
    raise AssertionError(f"README: no rule to check `{line}`; run it or extend check_line")


# ---------------------------------------------------------------- running blocks

TUTOR = re.compile(r"(^|\|\s*)tutor\b", re.M)


def shell_script(block: Block) -> str:
    code = block.code
    if block.marker == "run-with":
        sets = " ".join(f"--set {kv}" for kv in block.arg.split())
        code = re.sub(r"(?m)^(tutor (?:train|demo)\b[^#\n]*?)(\s+#.*)?$",
                      lambda m: f"{m.group(1)} {sets}", code)
    return "set -euo pipefail\n" + TUTOR.sub(r'\1"$TUTOR_PY" -m tutor', code)


def run_block(block: Block, cwd: Path) -> None:
    env = {**os.environ, "TUTOR_PY": sys.executable,
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if block.lang == "python":
        script = cwd / f"readme_{Path(block.doc).stem}_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-c", shell_script(block)]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (f"{block.where} failed ({out.returncode}):\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    for expected in re.findall(r"^# → (.*)$", block.code, re.M):
        assert expected in out.stdout, f"{block.where}: printed no {expected!r}"


# ---------------------------------------------------------------- the tests


def test_every_block_has_a_known_marker():
    known = {"run", "run-with", "parse", "show"}
    for b in all_blocks():
        where = b.where
        assert b.marker in known, f"{where}: precede the block with <!-- readme: run|parse|... -->"
        assert not (b.marker == "show" and b.lang in CODE), f"{where}: code must run or parse"
        assert b.marker != "run-with" or re.fullmatch(r"([\w.]+=\S+ ?)+", b.arg), where
        assert b.marker != "parse" or b.lang in {"bash", "sh"}, where
    fake = "<!-- readme: run -->\n```bash\ntutor list-cfg\n```\n\n```bash\ntutor models\n```\n"
    assert [b.marker for b in blocks(fake)] == ["run", None]  # the detector sees a bare block


@pytest.mark.slow
def test_run_and_parse_blocks_in_order(tmp_path):
    shutil.copytree(ROOT / "tutor/configs/data", tmp_path / "tutor/configs/data")
    repo_before = sorted(os.listdir(ROOT))
    world = World(tmp_path)
    done = {"run": 0, "run-with": 0, "parse": 0}
    for b in all_blocks():
        if b.marker in ("run", "run-with"):
            run_block(b, tmp_path)
        elif b.marker == "parse":
            for line in b.code.splitlines():
                check_line(line, world)
        else:
            continue
        done[b.marker] += 1
    assert done["run"] >= 5 and done["run-with"] >= 1 and done["parse"] >= 3, done
    assert sorted(os.listdir(ROOT)) == repo_before  # nothing was written into the repository


def _choices(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Sub-command name → its help text, from the parser itself."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help for c in action._choices_actions}


def test_command_table_lists_every_subcommand_with_its_help():
    parser = build_parser()
    expected = {}
    for name, text in _choices(parser).items():
        if name == "data":
            sub = next(a for a in parser._actions
                       if isinstance(a, argparse._SubParsersAction)).choices["data"]
            expected |= {f"data {k}": v for k, v in _choices(sub).items()}
        else:
            expected[name] = text
    rows = markdown_table(README, "<!-- readme: cli-table -->")[2:]
    table, world = {}, World(ROOT)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 3, row
        command = cells[0].strip("`").removeprefix("tutor ")
        table[command] = cells[1]
        example = cells[2].strip("`")
        assert example.startswith(f"tutor {command}"), row
        check_line(example, world)
    assert table == expected


def test_course_map_lists_every_notebook_with_its_runtime():
    rows = markdown_table(README, "| notebook |")[2:]
    listed = {re.match(r"\| `(\w+)`", r).group(1) for r in rows}
    assert listed == {p.stem for p in (ROOT / "nbs").glob("*.ipynb")}
    for row in rows:  # the last cell is a measured time such as "1 min 5 s"
        time_cell = row.strip("| ").split(" | ")[-1]
        assert re.fullmatch(r"(\d+ min )?\d+ s", time_cell), row
    # ... and the text before the table says how busy the machine was
    intro = README[README.index("Runtimes are the cell durations"):README.index("| notebook |")]
    assert re.search(r"load average [\d.]+", intro), "say the load average of the measurement"


def test_benchmark_tables_equal_their_files():
    found = 0
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"^<!-- readme: table (\S+) -->$", text, re.M):
            ours = markdown_table(text, f"<!-- readme: table {name} -->")
            theirs = [line for line in (ROOT / name).read_text().splitlines()
                      if line.startswith("|")]
            assert ours == theirs, (f"{path.name}: the table differs from {name}: "
                                    "run python tools/doc_tables.py")
            found += 1
    assert found >= 5, "the benchmark tables (docs/results.md, docs/export.md) are gone"


def test_doc_tables_tool_rewrites_a_stale_table(tmp_path):
    """tools/doc_tables.py puts a result file's table after its marker, and leaves the rest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "tools/doc_tables.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "r.md").write_text("Measured:\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    stale = "Intro\n<!-- readme: table r.md -->\n| a | b |\n| --- | --- |\n| 1 | 9 |\n\nAfter\n"
    fresh, differed = tool.refresh(stale, tmp_path)
    assert differed == ["r.md"]
    assert fresh == stale.replace("| 1 | 9 |", "| 1 | 2 |")
    assert tool.refresh(fresh, tmp_path) == (fresh, [])


def test_readme_is_short_and_links_every_page_of_docs():
    assert len(README.splitlines()) <= README_MAX_LINES, "move details to docs/"
    for page in DOCS[1:]:
        assert f"](docs/{page.name})" in README, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("line", [
    "tutor train no_such_recipe",
    "tutor train smollm2_135m_qlora_assistant --set train.lrr=1",
    "tutor train smollm2_135m_qlora_assistant --deepspeed zero9",
    "tutor chat merged_somewhere --prompt hi",
    "tutor chat smollm2-135m-instruct --prompt-template no_such_template",
    "tutor data check data/missing.jsonl",
    "tutor memory no-such-model",
    "tutor merge --bits 4",
    "make deploy",
    "make FAST=1",
    '.venv/bin/pip install -e ".[cuda]"',
    "rm -rf work_dirs",
])
def test_the_checker_refuses_mistakes(line):
    from tutor.errors import TutorError

    with pytest.raises((AssertionError, TutorError)):
        check_line(line, World(ROOT))
