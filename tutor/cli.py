"""The `tutor` command.

Start-up must stay fast (`tutor --help` in well under 1.5 s), so this module imports
only the standard library at the top; each sub-command imports torch, transformers
and friends inside its own handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from tutor import __version__
from tutor.errors import TutorError

Handler = Callable[[argparse.Namespace], int]


def _cmd_models(args: argparse.Namespace) -> int:
    from tutor.models import describe_bundled, tutor_home

    print(f"cache (TUTOR_HOME): {tutor_home()}")
    for row in describe_bundled():
        print(f"\n{row['name']}  (chat template: {row['template']})")
        print(f"  gguf : {row['gguf']}")
        print(f"  cache: {row['cache']}  [{row['state']}]")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tutor.demo import run_demo

    run_demo(model=args.model, bits=args.bits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tutor",
        description="Low-cost LLM fine-tuning: chat templates, loss masks, LoRA/QLoRA, "
        "packing, merge and chat. Runs offline on a CPU with a bundled 135M chat model.",
    )
    parser.add_argument("--version", action="version", version=f"tutor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the bundled model and where it is cached")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser("demo", help="the main job: load the bundled model and answer questions")
    p.add_argument("--model", default="smollm2-135m-instruct", help="bundled name, dir or hub id")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="load quantised")
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return handler(args)
    except TutorError as exc:
        # Bad input is reported in one line; tracebacks are for bugs.
        print(f"tutor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntutor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
