"""`tutor chat`: open a model (+ adapter) and talk to it in the terminal.

Interactive when stdin is a terminal: answers stream as they are decoded, and
``/reset``, ``/system TEXT``, ``/exit`` (or EOF, Ctrl-D) work between turns. Ctrl-C
while an answer streams stops that answer (it is not kept in the history); Ctrl-C at
the prompt ends the chat. With ``--prompt TEXT`` or piped stdin it answers once and
exits, which makes it scriptable.

Not handled: multi-line input in interactive mode (one line = one message), and
editing earlier turns.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tutor.errors import TutorError

if TYPE_CHECKING:
    from tutor.chat import ChatSession, GenerationSettings

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt; " \
       "/system alone clears it), /exit (or Ctrl-D)"


def pick_template(model: str, adapter: str | None, requested: str | None) -> str:
    """The chat template to use: --prompt-template, else the one recorded at training
    (adapter dir, then merged model dir), else "auto" (the tokenizer's own)."""
    from tutor.merge import recorded

    if requested:
        return requested
    for folder in (adapter, model):
        if folder and Path(folder).is_dir() and recorded(folder, "template"):
            return str(recorded(folder, "template"))
    return "auto"


def pick_system(model: str, adapter: str | None, requested: str | None) -> str | None:
    """The system prompt: --system, else the recipe's ``system:`` recorded at training
    (adapter dir, then model dir: tutor's metadata or a run's tutor_config.yaml; a GGUF
    file's ``tutor.system``), else None (the template's own default)."""
    from tutor.merge import recorded

    if requested is not None:
        return requested
    if str(model).endswith(".gguf") and Path(model).is_file():
        import gguf

        from tutor.common import GGUF_SYSTEM_KEY

        field = gguf.GGUFReader(model).fields.get(GGUF_SYSTEM_KEY)
        return None if field is None else str(field.contents())
    for folder in (adapter, model):
        if folder and Path(folder).is_dir() and recorded(folder, "system") is not None:
            return str(recorded(folder, "system"))
    return None


def open_session(
    model: str,
    adapter: str | None = None,
    template: str | None = None,
    bits: int | None = None,
    system: str | None = None,
    settings: GenerationSettings | None = None,
    backend: str = "auto",
) -> ChatSession:
    """Load `model` (4/8-bit if `bits`), attach `adapter` if given, return a session.

    A `.gguf` MODEL is decoded by llama.cpp (`backend` "llama.cpp", or "auto" when
    llama-cpp-python is installed) or read by transformers ("transformers")."""
    from tutor.chat import ChatSession, GenerationSettings
    from tutor.merge import check_adapter_dir, check_compatible
    from tutor.models import load

    system = pick_system(model, adapter, system)
    if str(model).endswith(".gguf"):
        return _open_gguf(model, adapter, template, bits, system,
                          settings or GenerationSettings(), backend)
    lm, tokenizer = load(model, bits=bits)
    if adapter is not None:
        import warnings

        from peft import PeftModel

        check_adapter_dir(Path(adapter))
        if bits is None:  # quantised layers have no plain in/out shapes to compare
            check_compatible(lm, Path(adapter), model)
        with warnings.catch_warnings():  # peft calls a deprecated transformers method
            warnings.simplefilter("ignore", FutureWarning)
            lm = PeftModel.from_pretrained(lm, adapter)
        lm.eval()
    return ChatSession(lm, tokenizer, template=pick_template(model, adapter, template),
                       system=system, settings=settings or GenerationSettings())


def _open_gguf(path: str, adapter: str | None, template: str | None, bits: int | None,
               system: str | None, settings: GenerationSettings, backend: str) -> ChatSession:
    """A session over a GGUF file: llama.cpp when asked/installed, else transformers."""
    from tutor import chat_llamacpp
    from tutor.chat import ChatSession

    if adapter is not None or bits is not None:
        raise TutorError("--adapter/--bits do not apply to a GGUF file (it is merged and "
                         "quantised already): export with `tutor export --adapter`")
    if backend == "llama.cpp" or (backend == "auto" and chat_llamacpp.available()):
        return chat_llamacpp.open_session(path, template or "auto", system, settings)
    from tutor.gguf_check import load_gguf

    lm, tokenizer = load_gguf(path)
    return ChatSession(lm, tokenizer, template=template or "auto", system=system,
                       settings=settings)


def _stats(session: ChatSession) -> str:
    g = session.last
    return (f"[{g.new_tokens} tokens in {g.seconds:.2f} s = {g.tokens_per_second:.1f} tok/s; "
            f"prompt {g.prompt_tokens} tokens; stopped by {g.stopped_by}]")


def answer(session: ChatSession, text: str, out: TextIO, stream: bool, verbose: bool) -> None:
    """Send `text`, writing the answer to `out` (piece by piece when `stream`)."""
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    dropped = session.trimmed
    reply = session.send(text, on_text=write if stream else None)
    if not stream:
        out.write(reply)
    out.write("\n")
    out.flush()
    if session.trimmed > dropped:
        print(f"[dropped the {session.trimmed - dropped} oldest messages to fit the "
              f"context window of {session.context_window} tokens]", file=sys.stderr)
    if verbose:
        print(_stats(session), file=sys.stderr)


def command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; return False when the chat should end."""
    name, _, arg = line.partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        session.reset()
        out.write("[conversation cleared]\n")
    elif name == "/system":
        session.system = arg.strip() or None
        out.write(f"[system prompt {'set' if session.system else 'cleared'}]\n")
    else:
        out.write(f"[unknown command {name}; {HELP}]\n")
    return True


def repl(session: ChatSession, inp: TextIO, out: TextIO, stream: bool = True,
         verbose: bool = False) -> int:
    """The interactive loop. Returns the exit status (0 for /exit, EOF or Ctrl-C)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out.write(f"tutor chat ({session.template.name} template). {HELP}\n")
    while True:
        try:
            line = input(">>> ").strip() if inp is sys.stdin else _readline(inp, out)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not command(session, line, out):
                return 0
            continue
        try:
            answer(session, line, out, stream, verbose)
        except KeyboardInterrupt:
            out.write("\n[answer interrupted]\n")


def _readline(inp: TextIO, out: TextIO) -> str:
    out.write(">>> ")
    out.flush()
    line = inp.readline()
    if not line:
        raise EOFError
    return line.strip()


def run_chat(session: ChatSession, prompt: str | None, stream: bool, verbose: bool,
             inp: TextIO | None = None, out: TextIO | None = None) -> int:
    """One-shot when `prompt` is given or stdin is piped; interactive otherwise.

    `inp`/`out` default to the streams current at the call (a default bound at import time
    would keep writing to whatever sys.stdout was then, e.g. a closed capture)."""
    inp, out = inp or sys.stdin, out or sys.stdout
    if prompt is None and not inp.isatty():
        prompt = inp.read().strip()
        if not prompt:
            raise TutorError("stdin was empty: pipe a message in, or pass --prompt TEXT")
    if prompt is not None:
        answer(session, prompt, out, stream, verbose)
        return 0
    return repl(session, inp, out, stream, verbose)
