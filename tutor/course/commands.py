"""`tutor lab`: the course's exercises on the command line (list them, check a notebook).

The toolkit's CLI never imports the course: it finds this sub-command through the entry-point
group ``tutor.commands`` (pyproject.toml), and calls `add_parser` with its sub-parsers.

Not handled: checking several notebooks in one call (run it once per notebook).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``tutor lab list`` and ``tutor lab check NOTEBOOK`` to the `tutor` command."""
    p = sub.add_parser("lab", help="the course's exercises: list them, check a student's notebook")
    lsub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    check = lsub.add_parser("check", help="run a copy of NOTEBOOK and report each exercise "
                            "(exit 0: all right, 1: not yet, 2: the notebook raised)")
    check.add_argument("notebook", help="a student's .ipynb (never modified)")
    check.add_argument("--timeout", type=int, default=600, metavar="S", help="seconds per cell")
    lsub.add_parser("list", help="the exercises of every notebook")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tutor.course import lab

    if args.lab_command == "list":
        print(lab.format_list())
        return 0
    results = lab.check_notebook(args.notebook, timeout=args.timeout)
    print(lab.format_results(results))
    return 0 if lab.all_right(results) else 1
