"""Write each measured table of the docs from the bench result file it comes from.

A table in README.md or docs/*.md preceded by ``<!-- readme: table FILE -->`` is FILE's table
(FILE: a Markdown result that a script in bench/ wrote, e.g. bench/results/chat_speed.md). This
tool replaces the table after each marker with FILE's table lines, so a new measurement reaches
the docs by running it once; ``--check`` changes nothing and exits 1 naming the tables that
differ (tests/test_readme.py makes the same comparison).

    python tools/doc_tables.py            # rewrite the tables that differ
    python tools/doc_tables.py --check    # list them, exit 1 if any

Not handled: a marker whose table is missing (the marker must stand right before the table, a
blank line between them at most) and result files with more than one table (the first is used).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- readme: table (\S+) -->$")


def docs(root: Path = ROOT) -> list[Path]:
    """The documents that may hold measured tables: the README, then docs/ in name order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def first_table(lines: list[str], start: int = 0) -> tuple[int, int]:
    """[begin, end) of the first run of lines starting with "|" at or after `start`."""
    begin = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(begin, len(lines)) if not lines[i].startswith("|")), len(lines))
    return begin, end


def refresh(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """`text` with every marked table replaced by its file's table, and the files that differed."""
    lines, stale = text.split("\n"), []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            source = (root / m.group(1)).read_text(encoding="utf-8").split("\n")
            s_begin, s_end = first_table(source)
            begin, end = first_table(lines, i + 1)
            if begin > i + 2:
                raise ValueError(f"line {i + 1}: no table right after the marker for {m.group(1)}")
            if lines[begin:end] != source[s_begin:s_end]:
                stale.append(m.group(1))
                lines[begin:end] = source[s_begin:s_end]
            i = begin
        i += 1
    return "\n".join(lines), stale


def main(argv: list[str]) -> int:
    check = "--check" in argv
    out_of_date = []
    for path in docs():
        text = path.read_text(encoding="utf-8")
        new, stale = refresh(text)
        out_of_date += [f"{path.relative_to(ROOT)}: {name}" for name in stale]
        if stale and not check:
            path.write_text(new, encoding="utf-8")
    for line in out_of_date:
        print(("differs: " if check else "rewrote: ") + line)
    return 1 if check and out_of_date else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
