"""`tutor chat`: talk to an opened model (`tutor.chat.load.open_session`) in the terminal.

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
from typing import TYPE_CHECKING, TextIO

from tutor.errors import TutorError

if TYPE_CHECKING:
    from tutor.chat.session import ChatSession

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt; " \
       "/system alone clears it), /exit (or Ctrl-D)"


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
