"""The main job behind `make demo`.

For now: load the bundled model (converting it on first use), ask it a few
questions greedily and print the answers with timings. The full fine-tuning
demo (train → convert → merge → chat before/after) grows here.
"""

from __future__ import annotations

import time

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Who are you?",
    "Give me one tip for learning a new language.",
)


def run_demo(model: str = "smollm2-135m-instruct", bits: int | None = None) -> list[str]:
    """Print the bundled model's answers to `DEMO_QUESTIONS`; return the answers."""
    from tutor.chat import ask
    from tutor.models import footprint_bytes, load

    start = time.perf_counter()
    lm, tokenizer = load(model, bits=bits)
    loaded = time.perf_counter() - start
    size_mb = footprint_bytes(lm) / 2**20
    print(f"model: {model}  bits: {bits or 'full'}  footprint: {size_mb:.0f} MiB  "
          f"load: {loaded:.1f} s")
    answers = []
    for question in DEMO_QUESTIONS:
        t0 = time.perf_counter()
        answer = ask(lm, tokenizer, question)
        print(f"\nQ: {question}\nA: {answer}\n   ({time.perf_counter() - t0:.1f} s)")
        answers.append(answer)
    return answers
