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


def _cmd_memory(args: argparse.Namespace) -> int:
    from tutor.memory import Setup, estimate, format_table, get_arch

    setup = Setup(method=args.method, seq_len=args.seq_len, batch=args.batch,
                  grad_checkpointing=args.grad_checkpointing, optimizer=args.optimizer,
                  lora_r=args.lora_r, lora_dropout=args.lora_dropout, dtype=args.dtype)
    print(format_table(estimate(get_arch(args.model), setup), budget_gib=args.budget))
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

    p = sub.add_parser("memory", help="estimate training memory for full / LoRA / QLoRA")
    p.add_argument("model", help="built-in config name (e.g. internlm2-chat-7b), bundled name "
                   "or a directory with config.json")
    p.add_argument("--method", choices=("full", "lora", "qlora"), default="qlora")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward (default: on, as XTuner does)")
    p.add_argument("--optimizer", choices=("adamw", "paged_adamw_8bit"), default="adamw")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of unquantised weights and activations")
    p.add_argument("--budget", type=float, default=8.0, help="GPU memory to compare with, GiB")
    p.set_defaults(handler=_cmd_memory)
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
