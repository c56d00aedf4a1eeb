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


def _cmd_convert(args: argparse.Namespace) -> int:
    from tutor.merge import convert_checkpoint, dir_bytes

    out = convert_checkpoint(args.checkpoint, args.out, base_model=args.base_model,
                             template=args.template, force=args.force)
    print(f"adapter written to {out} ({dir_bytes(out) / 2**20:.2f} MiB)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import contextlib

    from tutor.merge import merge

    # Saving imports DeepSpeed (via accelerate), which logs to stdout; keep stdout for
    # the result line so scripts can parse it.
    with contextlib.redirect_stdout(sys.stderr):
        report = merge(args.base, args.adapter, args.out, dtype=args.dtype, force=args.force)
    print(report.summary())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tutor.chat import GenerationSettings
    from tutor.chat_repl import open_session, run_chat

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, prompt_lookup=args.prompt_lookup)
    session = open_session(args.model, adapter=args.adapter, template=args.prompt_template,
                           bits=args.bits, system=args.system, settings=settings)
    return run_chat(session, args.prompt, stream=not args.no_streamer, verbose=args.verbose)


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

    p = sub.add_parser("convert", help="training checkpoint -> standalone LoRA adapter dir")
    p.add_argument("checkpoint", help="a Trainer checkpoint dir (OUTPUT/checkpoint-N)")
    p.add_argument("out", help="where to write the adapter directory")
    p.add_argument("--base-model", help="override the base model recorded at training")
    p.add_argument("--template", help="override the chat template recorded at training")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model and verify it")
    p.add_argument("base", help="the base model the adapter was trained on")
    p.add_argument("adapter", help="adapter dir (from `tutor convert`)")
    p.add_argument("out", help="where to write the merged model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved merged weights (merging is done in it)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_merge)

    p = sub.add_parser("chat", help="talk to a model (+ adapter) in the terminal")
    p.add_argument("model", help="bundled name, merged/model dir or hub id")
    p.add_argument("--adapter", help="a LoRA adapter dir to apply on top of MODEL")
    p.add_argument("--prompt-template", metavar="NAME",
                   help="chat template name or 'auto' (default: recorded at training, else auto)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None, help="load quantised")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="greedy only: verify up to N tokens guessed from the conversation "
                   "per step (helps when answers copy from the prompt; default 0 = off)")
    p.add_argument("--no-streamer", action="store_true", help="print whole answers at once")
    p.add_argument("--prompt", help="answer this one message and exit (or pipe stdin)")
    p.add_argument("--verbose", action="store_true", help="report tokens/s after each answer")
    p.set_defaults(handler=_cmd_chat)
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
