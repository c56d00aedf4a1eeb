"""Chat decoding speed on the bundled model: tutor's chat path vs. plain `model.generate`.

For fp32, bf16, 8-bit and 4-bit (each precision in its own process, so its peak
memory is that process's max RSS), every prompt is answered by

- plain:  ``model.generate(**inputs, max_new_tokens=N)`` with the model's defaults
          (greedy, dynamic cache), the way most tutorials call it;
- tutor:  ``tutor.chat.generate`` with tutor's default settings (what `tutor chat`
          and `ChatSession` run: greedy, streamer, stop words);
- lookup: the same with prompt-lookup decoding (``--prompt-lookup 10``);
- static: plain generate with a static KV cache (``cache_implementation="static"``),
          the usual first step towards torch.compile.

Runs alternate (plain, tutor, static, plain, ...) so that load from other processes
hits all of them alike; the median of the repeats is reported. Output equality is
checked token for token. Results go to bench/results/chat_speed.{json,md}.

Usage: python bench/chat_speed.py [--max-new-tokens 48] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRECISIONS = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "8-bit": {"bits": 8},
              "4-bit": {"bits": 4}}
PROMPTS = {
    "free answer": [{"role": "user", "content": "Give me three tips for learning a new language."}],
    "edit a text": [{"role": "user", "content":
                     "Fix the spelling in this sentence and return it: 'The quick brown fox "
                     "jumpd over the lazzy dog while the farmer was sleeping in the barn.'"}],
    "follow-up": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."},
                  {"role": "user", "content": "Tell me two facts about Paris."}],
}
OUT = Path(__file__).parent / "results"


def measure(model, tok, template, messages, max_new_tokens: int, repeats: int) -> dict:
    """tok/s of each variant on one conversation (median of `repeats`, runs alternating)."""
    import torch

    from tutor.chat import GenerationSettings, generate

    ids = tok.encode(template.render(messages, add_generation_prompt=True),
                     add_special_tokens=False)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                           dtype=torch.long)}

    def plain(**extra):
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, **extra)
        new = out[0, len(ids):]
        return tok.decode(new, skip_special_tokens=True).strip(), len(new)

    def tutor(**extra):
        settings = GenerationSettings(max_new_tokens=max_new_tokens, **extra)
        g = generate(model, tok, ids, settings, template.stop_words)
        return g.text, g.new_tokens

    runs = {"plain": plain, "tutor": tutor, "lookup": lambda: tutor(prompt_lookup=10),
            "static": lambda: plain(cache_implementation="static")}
    outputs = {k: f() for k, f in runs.items()}  # warm-up: static cache allocates, kernels load
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    row = {f"{k}_tok_s": outputs[k][1] / statistics.median(v) for k, v in times.items()}
    row.update(tokens=outputs["plain"][1], answer=outputs["tutor"][0],
               **{f"{k}_same": outputs[k] == outputs["plain"] for k in runs if k != "plain"})
    return row


def one_precision(name: str, max_new_tokens: int, repeats: int, threads: int | None) -> dict:
    """Benchmark one precision in this process; return its rows and peak memory."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from tutor.models import footprint_bytes, load
    from tutor.templates import get_template

    model, tok = load(**PRECISIONS[name])
    template = get_template("auto", tokenizer=tok)
    rows = [{"precision": name, "prompt": label,
             **measure(model, tok, template, messages, max_new_tokens, repeats)}
            for label, messages in PROMPTS.items()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rows": rows, "peak_rss_bytes": peak, "footprint_bytes": footprint_bytes(model),
            "threads": torch.get_num_threads()}


def table(results: dict) -> str:
    """Markdown table: tok/s, ratio to plain generate and (for the others) same output?"""
    lines = ["| precision | prompt | new tokens | plain generate tok/s | tutor chat | "
             "tutor + prompt lookup | generate + static cache | weights MiB | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(r: dict, k: str) -> str:
        same = "" if r[f"{k}_same"] else ", output differs"
        return f"{r[f'{k}_tok_s']:.1f} ({r[f'{k}_tok_s'] / r['plain_tok_s']:.2f}x{same})"

    for name, res in results.items():
        for r in res["rows"]:
            lines.append(
                f"| {name} | {r['prompt']} | {r['tokens']} | {r['plain_tok_s']:.1f} | "
                f"{cell(r, 'tutor')} | {cell(r, 'lookup')} | {cell(r, 'static')} | "
                f"{res['footprint_bytes'] / 2**20:.0f} | {res['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On a CPU shared with other "
                        "jobs, 1 avoids threads waiting for each other at every small op")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one precision
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_precision(args.one, args.max_new_tokens, args.repeats,
                                       args.threads)))
        return
    results = {}
    for name in args.precisions:
        cmd = [sys.executable, __file__, "--one", name, "--max-new-tokens",
               str(args.max_new_tokens), "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        # Written after every precision, so an interrupted run keeps what it measured.
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "chat_speed.json").write_text(json.dumps(results, indent=2) + "\n")
        (OUT / "chat_speed.md").write_text(table(results))
        print(table(results), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
