"""The `tutor` command.

Start-up must stay fast (`tutor --help` in well under 1.5 s), so this module imports
only the standard library at the top; each sub-command imports torch, transformers
and friends inside its own handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from tutor import __version__
from tutor.errors import TutorError

Handler = Callable[[argparse.Namespace], int]
COMMANDS_GROUP = "tutor.commands"  # entry points that add sub-commands (the course's `lab`)


def _cmd_models(args: argparse.Namespace) -> int:
    from tutor.models import describe_bundled, tutor_home

    print(f"cache (TUTOR_HOME): {tutor_home()}")
    for row in describe_bundled():
        print(f"\n{row['name']}  (chat template: {row['template']})")
        print(f"  gguf : {row['gguf']}")
        print(f"  cache: {row['cache']}  [{row['state']}]")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from tutor.demo import quick_demo, run_practice

    if args.quick:
        quick_demo(model=args.model or "smollm2-135m-instruct", bits=args.bits)
        return 0
    if args.bits is not None:
        raise TutorError("--bits only applies with --quick (the practice trains QLoRA as "
                         "its recipe says and chats in fp32)")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = [*args.set, *([f"model={args.model}"] if args.model else [])]
    run_practice(args.out, overrides=overrides)
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tutor.common import atomic_file
    from tutor.formats import iter_conversations

    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise TutorError(f"{out}: the output must be a .jsonl file (one conversation per line)")
    if out.resolve() == Path(args.input).resolve():
        raise TutorError(f"{out} is the input file; write the conversion to another path")
    from tutor.datacheck import is_pair_file
    from tutor.formats import iter_pairs

    if is_pair_file(args.input, args.format):  # prompt/chosen/rejected as message lists
        rows = [dict(zip(("prompt", "chosen", "rejected"), pair, strict=True))
                for _, pair in iter_pairs(args.input)]
        unit = "pairs"
    else:
        rows = [{"messages": m} for _, m in iter_conversations(args.input, args.format)]
        unit = "conversations"
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} {unit} to {out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from tutor.datacheck import check_file, check_pairs, format_report, is_pair_file
    from tutor.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    if is_pair_file(args.file, args.format):
        report = check_pairs(args.file, tokenizer, args.template, args.max_length)
    else:
        report = check_file(args.file, tokenizer, args.template, args.max_length, args.format)
    print(format_report(report))
    return 1 if report.errors else 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from tutor.common import IGNORE_INDEX
    from tutor.data import encode
    from tutor.datacheck import is_pair_file
    from tutor.formats import iter_conversations
    from tutor.models import load_tokenizer
    from tutor.viz import ansi_legend, mask_ansi

    tokenizer = load_tokenizer(args.model)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(ansi_legend(color))
    if is_pair_file(args.file, args.format):
        return _show_pairs(args, tokenizer, color)
    for i, (where, messages) in enumerate(iter_conversations(args.file, args.format)):
        if i >= args.n:
            break
        sample = encode(messages, tokenizer, args.template, args.max_length)
        trained = sum(label != IGNORE_INDEX for label in sample["labels"])
        print(f"\n── {where}: {len(sample['input_ids'])} tokens, {trained} trained ──")
        print(mask_ansi(sample["input_ids"], sample["labels"], tokenizer, color=color))
    return 0


def _show_pairs(args: argparse.Namespace, tokenizer: object, color: bool) -> int:
    """The shared prompt once, then each answer from where it leaves the prompt."""
    from tutor.common import IGNORE_INDEX
    from tutor.data import encode_pair
    from tutor.formats import iter_pairs
    from tutor.viz import mask_ansi

    for i, (where, pair) in enumerate(iter_pairs(args.file)):
        if i >= args.n:
            break
        enc = encode_pair(*pair, tokenizer, args.template, args.max_length)
        p = enc["prompt_length"]
        print(f"\n── {where}: prompt {p} tokens (shared) ──")
        print(mask_ansi(enc["chosen"]["input_ids"][:p], enc["chosen"]["labels"][:p], tokenizer,
                        color=color))
        for side in ("chosen", "rejected"):
            ids, labels = enc[side]["input_ids"][p:], enc[side]["labels"][p:]
            trained = sum(label != IGNORE_INDEX for label in labels)
            print(f"── {side}: {len(ids)} more tokens, {trained} trained ──")
            print(mask_ansi(ids, labels, tokenizer, color=color))
    return 0


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="convert, check and show datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    from tutor.formats import FORMATS, PAIRS_FORMAT

    formats = ("auto", *FORMATS, PAIRS_FORMAT)  # auto also recognises pair files

    def common(p: argparse.ArgumentParser, tokenizer: bool = True) -> None:
        p.add_argument("--format", default="auto", choices=formats, help="record format")
        if tokenizer:
            p.add_argument("--template", default="auto", help="chat template name (auto = "
                           "the tokenizer's own)")
            p.add_argument("--max-length", type=int, default=None, help="truncate to N tokens")
            p.add_argument("--model", default="smollm2-135m-instruct",
                           help="whose tokenizer to use (bundled name, dir or hub id)")

    p = dsub.add_parser("convert", help="any supported file → messages JSONL (atomic write)")
    p.add_argument("input", help=".jsonl, .json or .csv file")
    p.add_argument("out", help="output .jsonl")
    common(p, tokenizer=False)
    p.set_defaults(handler=_cmd_data_convert)

    p = dsub.add_parser("check", help="counts, token lengths, trained share, problems "
                        "(exit 1 on errors)")
    p.add_argument("file")
    common(p)
    p.set_defaults(handler=_cmd_data_check)

    p = dsub.add_parser("show", help="print samples with trained tokens highlighted")
    p.add_argument("file")
    p.add_argument("-n", type=int, default=2, help="how many samples")
    p.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    common(p)
    p.set_defaults(handler=_cmd_data_show)


def _cmd_memory(args: argparse.Namespace) -> int:
    from tutor.memory import Setup, estimate, format_table, get_arch

    setup = Setup(method=args.method, seq_len=args.seq_len, batch=args.batch,
                  grad_checkpointing=args.grad_checkpointing, optimizer=args.optimizer,
                  lora_r=args.lora_r, lora_dropout=args.lora_dropout, dtype=args.dtype,
                  chunked_loss=args.chunked_loss, loss_chunk=args.loss_chunk,
                  offload=args.offload)
    print(format_table(estimate(get_arch(args.model), setup), budget_gib=args.budget))
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
        report = merge(args.base, args.adapter, args.out, dtype=args.dtype, force=args.force,
                       base_from_nf4=args.base_from_nf4)
    print(report.summary())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import contextlib

    from tutor.export import export_gguf

    with contextlib.redirect_stdout(sys.stderr):  # stdout keeps only the summary
        report = export_gguf(args.model, args.out, kind=args.type, adapter=args.adapter,
                             ollama=args.ollama, verify=not args.no_check,
                             template=args.prompt_template)
    print(report.summary())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tutor.chat import GenerationSettings
    from tutor.chat.load import open_session
    from tutor.chat.repl import run_chat

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, prompt_lookup=args.prompt_lookup)
    session = open_session(args.model, adapter=args.adapter, template=args.prompt_template,
                           bits=args.bits, system=args.system, settings=settings,
                           backend=args.backend)
    return run_chat(session, args.prompt, stream=not args.no_streamer, verbose=args.verbose)
def _cmd_eval(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from tutor.eval import evaluate, evaluate_pairs, is_pair_file
    from tutor.train_config import resolve_data_path

    # With --json, stdout carries the JSON alone: anything printed while loading and
    # answering (answers, library notices) goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    pair_files = [f for f in args.files if is_pair_file(resolve_data_path(f, "tutor eval"))]
    other = [f for f in args.files if f not in pair_files]
    with quiet:
        scores = evaluate(args.model, other, adapter=args.adapter,
                          template=args.prompt_template, max_new_tokens=args.max_new_tokens,
                          echo=not args.json) if other else []
        pairs = evaluate_pairs(args.model, pair_files, adapter=args.adapter,
                               template=args.prompt_template) if pair_files else []
    if args.json:
        print(json.dumps({"files": {s.path: s.to_json() for s in [*scores, *pairs]}}))
        return 0
    for s in scores:
        loss = "n/a" if s.answer_loss is None else f"{s.answer_loss:.4f}"
        print(f"{s.path}: {s.hits}/{s.total} answers with every keyword, answer loss {loss}")
    for s in pairs:
        print(f"{s.path}: preference accuracy {s.accuracy:.3f} over {len(s.margins)} pairs "
              f"(chosen more likely than rejected), mean margin {s.mean_margin:.3f} nats; "
              f"per token: accuracy {s.token_accuracy:.3f}")
    return 0


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score greedy answers (keyword hits) and answer loss on "
                       "held-out files")
    p.add_argument("model", help="bundled name, merged/model dir or hub id")
    p.add_argument("files", nargs="+", metavar="FILE", help="question+expected JSONL, or any "
                   "format tutor reads (scored by the loss on its reference answers), or "
                   "preference pairs (scored by preference accuracy and mean margin)")
    p.add_argument("--adapter", help="a LoRA adapter dir to apply on top of MODEL")
    p.add_argument("--prompt-template", metavar="NAME",
                   help="chat template name or 'auto' (default: recorded at training, else auto)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", action="store_true", help='print {"files": {FILE: {"hits", '
                   '"total", "answer_loss"}}} on stdout')
    p.set_defaults(handler=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    import logging
    import os

    from tutor.launch import write_rank_report
    from tutor.train import train

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        result = train(args.config, args.set, resume=args.resume, deepspeed=args.deepspeed,
                       overwrite=args.overwrite)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: say how to go on
        raise type(exc)(_resume_hint(args)) from exc
    m, rank = result.metrics, os.environ.get("RANK", "0")
    world = os.environ.get("WORLD_SIZE", "1")
    mean_loss = m.get("train_loss", float("nan"))
    steps = result.global_step - result.start_step  # this run's own (a resume starts later)
    resumed = f" (after step {result.start_step}, now at {result.global_step})" \
        if result.start_step else ""
    print(
        f"rank {rank}/{world} done: {steps} steps in "
        f"{m.get('train_runtime', 0):.0f} s{resumed}, {m['trained_tok_s']:.0f} trained tok/s "
        f"({m['all_tok_s']:.0f} all), mean loss {mean_loss:.4f}, "
        f"optimizer holds {m['optimizer_bytes']} B; output in {result.output_dir}"
    )
    write_rank_report(steps, mean_loss, m["optimizer_bytes"])  # for tutor.launch
    return 0


def _resume_hint(args: argparse.Namespace) -> str:
    """How to go on after an interrupted `tutor train` (its newest checkpoint, or none)."""
    import shlex

    from tutor.train import last_checkpoint
    from tutor.train_config import load_config

    output_dir = load_config(args.config, args.set).output_dir  # train() read it already
    again = shlex.join(["tutor", "train", args.config,
                        *[a for kv in args.set for a in ("--set", kv)]])
    if last_checkpoint(output_dir):
        return f"continue with: {again} --resume"
    return f"no checkpoint was saved in {output_dir} yet; start again with: {again} --overwrite"


def _cmd_list_cfg(args: argparse.Namespace) -> int:
    from tutor.train_config import list_recipes, load_config

    for name in list_recipes():
        cfg = load_config(name)
        method = "full" if cfg.lora is None else ("qlora" if cfg.bits == 4 else "lora")
        ds = f"  deepspeed={cfg.deepspeed}" if cfg.deepspeed else ""
        pref = f"  method={cfg.method}" if cfg.method != "sft" else ""  # trains on pairs
        print(f"{name:42s} {method:5s} {cfg.model}{ds}{pref}")
    return 0


def _cmd_copy_cfg(args: argparse.Namespace) -> int:
    from tutor.train_config import copy_recipe

    print(f"copied to {copy_recipe(args.name, args.dest)}")
    return 0


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune from a recipe (LoRA/QLoRA/full, on Trainer)")
    p.add_argument("config", help="a recipe name (tutor list-cfg) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the previous run in "
                   "output_dir first (a non-empty output_dir is refused otherwise)")
    p.add_argument("--deepspeed", default=None, metavar="NAME|JSON",
                   help="zero1, zero2, zero3, zero2_offload, zero3_offload or a JSON file "
                   "(launch with torchrun --nproc_per_node N -m tutor train ...)")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("list-cfg", help="list the ready recipes")
    p.set_defaults(handler=_cmd_list_cfg)

    p = sub.add_parser("copy-cfg", help="copy a recipe to edit it")
    p.add_argument("name")
    p.add_argument("dest", help="a file path or an existing directory")
    p.set_defaults(handler=_cmd_copy_cfg)


def _add_plugin_parsers(sub: argparse._SubParsersAction) -> None:
    """Sub-commands other packages register under the entry-point group `COMMANDS_GROUP`.

    Each entry point names a function ``add_parser(subparsers)``. The course registers
    ``tutor lab`` this way, so the toolkit never imports the course.
    """
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name):
        ep.load()(sub)


def build_parser() -> argparse.ArgumentParser:
    from tutor.models import BITS, DTYPES

    parser = argparse.ArgumentParser(
        prog="tutor",
        description="Low-cost LLM fine-tuning: chat templates, loss masks, LoRA/QLoRA, "
        "packing, merge and chat. Runs offline on a CPU with a bundled 135M chat model.",
    )
    parser.add_argument("--version", action="version", version=f"tutor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the bundled model and where it is cached")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser("demo", help="the main job: score, QLoRA-train, convert, merge and score "
                       "again the bundled model; timings and a transcript")
    p.add_argument("--out", default="work_dirs/demo", help="output directory (a previous "
                   "demo's is replaced; default: work_dirs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="no training: only load the model and answer a few questions")
    p.add_argument("--model", default=None, help="base model: bundled name, dir or hub id "
                   "(default: the recipe's, smollm2-135m-instruct)")
    p.add_argument("--bits", type=int, choices=BITS, default=None,
                   help="with --quick: load quantised")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the recipe, e.g. --set train.epochs=1 (repeatable)")
    p.set_defaults(handler=_cmd_demo)

    _add_data_parser(sub)
    from tutor.memory import DTYPE_BYTES, GPU_RECIPE, METHODS, OPTIMIZERS

    g = GPU_RECIPE  # the defaults: the shipped 7B/8B QLoRA recipes' training settings
    p = sub.add_parser("memory", help="estimate training memory for full / LoRA / QLoRA",
                       description="Defaults = the shipped GPU QLoRA recipes "
                       "(internlm2_chat_7b_qlora_oasst1, llama3_8b_instruct_qlora): "
                       f"LoRA r={g.lora_r} dropout {g.lora_dropout}, gradient checkpointing, "
                       f"chunked loss ({g.loss_chunk} rows), {g.optimizer}, no offload.")
    p.add_argument("model", help="built-in config name (e.g. internlm2-chat-7b), bundled name "
                   "or a directory with config.json")
    p.add_argument("--method", choices=METHODS, default=g.method)
    p.add_argument("--seq-len", type=int, default=g.seq_len)
    p.add_argument("--batch", type=int, default=g.batch)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   default=g.grad_checkpointing, help="recompute activations in backward")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=g.offload,
                   help="checkpointed block inputs in CPU memory (train.offload_activations)")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction,
                   default=g.chunked_loss, help="loss in chunks of rows (train.chunked_loss)")
    p.add_argument("--loss-chunk", type=int, default=g.loss_chunk,
                   help="rows per chunk (train.loss_chunk_size)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=g.optimizer)
    p.add_argument("--lora-r", type=int, default=g.lora_r)
    p.add_argument("--lora-dropout", type=float, default=g.lora_dropout)
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=g.dtype,
                   help="dtype of unquantised weights and activations")
    p.add_argument("--budget", type=float, default=8.0, help="GPU memory to compare with, GiB")
    p.set_defaults(handler=_cmd_memory)
    p = sub.add_parser("convert", help="training checkpoint -> standalone LoRA adapter dir")
    p.add_argument("checkpoint", help="a Trainer checkpoint dir (OUTPUT/checkpoint-N)")
    p.add_argument("out", help="where to write the adapter directory")
    p.add_argument("--base-model", help="override the base model recorded at training")
    p.add_argument("--template", help="override the chat template recorded at training")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model (--base-from-nf4: "
                       "into the NF4 base a QLoRA adapter was trained against) and verify it")
    p.add_argument("base", help="the base model the adapter was trained on")
    p.add_argument("adapter", help="adapter dir (from `tutor convert`)")
    p.add_argument("out", help="where to write the merged model")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the saved merged weights (merging is done in it)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--base-from-nf4", action="store_true",
                   help="QLoRA adapters: merge into the NF4 base dequantised as training saw "
                   "it (bitsandbytes, the run's dtype), so the merged model equals the trained "
                   "NF4 base+adapter (checked against it); default: the full-precision base, "
                   "checked against base+adapter")
    p.set_defaults(handler=_cmd_merge)

    p = sub.add_parser("export", help="write a GGUF file for llama.cpp / Ollama, checked "
                       "against the source")
    p.add_argument("model", help="merged/base model dir or the bundled name")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", choices=("f16", "bf16", "q8_0", "q4_0"),
                   help="q4_0 is tutor's own mix, not llama.cpp's Q4_0: 4-bit blocks of 32, but "
                   "the embedding, attn_v and ffn_down kept at Q8_0 (default: q8_0)")
    p.add_argument("--adapter", help="a LoRA adapter dir to merge into MODEL first")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile")
    p.add_argument("--prompt-template", metavar="NAME",
                   help="chat template (default: recorded at training, else the tokenizer's)")
    p.add_argument("--no-check", action="store_true",
                   help="skip reloading the file and comparing logits with the source")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("chat", help="talk to a model (+ adapter) in the terminal, under the system "
                       "prompt recorded at training; --temperature, --top-p, "
                       "--repetition-penalty sample")
    p.add_argument("model", help="bundled name, merged/model dir or hub id")
    p.add_argument("--adapter", help="a LoRA adapter dir to apply on top of MODEL")
    p.add_argument("--prompt-template", metavar="NAME",
                   help="chat template name or 'auto' (default: recorded at training, else auto)")
    p.add_argument("--bits", type=int, choices=BITS, default=None, help="load quantised")
    p.add_argument("--system", help="system prompt (default: the recipe's `system:` recorded "
                   "with the adapter/model, else the template's own)")
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
    p.add_argument("--backend", default="auto", choices=("auto", "transformers", "llama.cpp"),
                   help="for a .gguf MODEL: llama.cpp (auto: when llama-cpp-python is "
                   "installed) or transformers")
    p.set_defaults(handler=_cmd_chat)
    _add_train_parsers(sub)
    _add_eval_parser(sub)

    _add_plugin_parsers(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), raised like Ctrl-C so that the same cleanup runs
    (the run's lock is removed, temporary files deleted) and the same line is printed."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals: main only
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)  # a caller's own handler (tests call main)


def _main(argv: Sequence[str] | None) -> int:
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
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see `_terminated`)
        hint = f"; {exc}" if str(exc) else ""
        print(f"\ntutor: interrupted{hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:
        # `tutor data check FILE | head` closed our stdout early: not an error of ours.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
