"""Opening a model to talk to: a directory, the bundled name or a GGUF file (+ adapter).

`open_session` is the one way chat, eval, export checks and the demo load a model for
generation: it picks the chat template and system prompt the model was trained with
(`tutor.runs.pick_template`, `pick_system`), loads it (4/8-bit if asked), attaches a LoRA
adapter after checking it fits, and returns a `ChatSession`. A GGUF file is decoded by
llama.cpp when it is installed (`tutor.chat.llamacpp`), else read back by transformers.

Not handled: several adapters at once, an adapter on a GGUF file (export merged instead),
and quantising a GGUF further (it is quantised already).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tutor.chat.llamacpp import available as llamacpp_available
from tutor.chat.llamacpp import gguf_session
from tutor.chat.session import ChatSession, GenerationSettings
from tutor.errors import TutorError
from tutor.export.check import check_gguf, load_gguf
from tutor.merge import check_adapter_dir, check_compatible
from tutor.models import load
from tutor.runs import GGUF_SYSTEM_KEY, pick_template, recorded_system

__all__ = ["open_session", "pick_system", "pick_template"]


def pick_system(model: str, adapter: str | None, requested: str | None) -> str | None:
    """The system prompt: --system, else the recipe's ``system:`` recorded at training
    (adapter dir, then model dir: tutor's metadata or a run's tutor_config.yaml; a GGUF
    file's ``tutor.system``), else None (the template's own default)."""
    if requested is not None:
        return requested
    if str(model).endswith(".gguf") and Path(model).is_file():
        import gguf

        check_gguf(model)  # a damaged file: one line naming it, not gguf-py's traceback
        field = gguf.GGUFReader(model).fields.get(GGUF_SYSTEM_KEY)
        return None if field is None else str(field.contents())
    return recorded_system(model, adapter)


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
    system = pick_system(model, adapter, system)
    if str(model).endswith(".gguf"):
        return _open_gguf(model, adapter, template, bits, system,
                          settings or GenerationSettings(), backend)
    lm, tokenizer = load(model, bits=bits)
    if adapter is not None:
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
    if adapter is not None or bits is not None:
        raise TutorError("--adapter/--bits do not apply to a GGUF file (it is merged and "
                         "quantised already): export with `tutor export --adapter`")
    if backend == "llama.cpp" or (backend == "auto" and llamacpp_available()):
        return gguf_session(path, template or "auto", system, settings)
    lm, tokenizer = load_gguf(path)
    return ChatSession(lm, tokenizer, template=template or "auto", system=system,
                       settings=settings)
