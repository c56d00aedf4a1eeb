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

``--gguf`` instead compares engines, one run each, same prompts and greedy decoding:
HF ``generate`` at fp32 / bf16 / NF4 against llama.cpp (llama-cpp-python) on the bundled
model exported by `tutor export` at f16 / q8_0 / q4_0; tokens/s, peak RSS, and how many
leading tokens of each answer equal HF fp32's. Results: bench/results/chat_speed_gguf.*.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tutor.measure import peak_rss_bytes

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
    return {"rows": rows, "peak_rss_bytes": peak_rss_bytes(),
            "footprint_bytes": footprint_bytes(model),
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


ENGINES = {"hf fp32": {}, "hf bf16": {"dtype": "bfloat16"}, "hf nf4": {"bits": 4},
           "llama.cpp f16": "f16", "llama.cpp q8_0": "q8_0", "llama.cpp q4_0": "q4_0"}
GGUF_DIR = OUT / "gguf"  # exported files (not committed)


def one_engine(name: str, max_new_tokens: int, threads: int | None) -> dict:
    """One engine in this process: token ids and tok/s per prompt, peak RSS."""
    from tutor.models import load
    from tutor.templates import get_template

    spec = ENGINES[name]
    rows = []
    if isinstance(spec, str):
        from transformers import AutoTokenizer

        from tutor.chat.llamacpp import LlamaCppTokenizer, open_llama
        from tutor.models import resolve

        # the tokenizer only (its chat template): loading the HF model would inflate the RSS
        tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
        llm = open_llama(GGUF_DIR / f"smol-{spec}.gguf", threads=threads)
        template = get_template("auto", tokenizer=tok)
        for label, messages in PROMPTS.items():
            ids = LlamaCppTokenizer(llm).encode(template.render(messages, True))
            start, new = time.perf_counter(), []
            for t in llm.generate(ids, reset=True, temp=0.0, top_k=1):
                new.append(t)
                if len(new) >= max_new_tokens:
                    break
            rows.append({"prompt": label, "ids": new,
                         "tok_s": len(new) / (time.perf_counter() - start)})
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        model, tok = load(**spec)
        template = get_template("auto", tokenizer=tok)
        for label, messages in PROMPTS.items():
            ids = tok.encode(template.render(messages, True), add_special_tokens=False)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(
                    1, len(ids), dtype=torch.long), max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, len(ids):].tolist()
            rows.append({"prompt": label, "ids": new,
                         "tok_s": len(new) / (time.perf_counter() - start)})
    return {"rows": rows, "peak_rss_bytes": peak_rss_bytes()}


def gguf_table(results: dict) -> str:
    """Markdown: engine, prompt, tok/s, x HF fp32, leading tokens equal to HF fp32, RSS."""
    from tutor.export.check import leading_equal

    base = {r["prompt"]: r for r in results["hf fp32"]["rows"]}
    lines = ["| engine | prompt | tok/s | x HF fp32 | tokens equal to HF fp32 | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        for r in res["rows"]:
            b = base[r["prompt"]]
            lines.append(f"| {name} | {r['prompt']} | {r['tok_s']:.1f} | "
                         f"{r['tok_s'] / b['tok_s']:.2f} | {leading_equal(r['ids'], b['ids'])}"
                         f"/{len(b['ids'])} | {res['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def run_gguf(max_new_tokens: int, threads: int | None) -> None:
    """Export the bundled model at each type (once), then run every engine in a child."""

    from tutor.export import export_model
    from tutor.models import load, resolve
    from tutor.templates import get_template

    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    model, tok = load()
    for kind in ("f16", "q8_0", "q4_0"):
        path = GGUF_DIR / f"smol-{kind}.gguf"
        if not path.is_file():
            export_model(model, tok, Path(resolve("smollm2-135m-instruct")), path, kind,
                         get_template("auto", tokenizer=tok).stop_words)
    del model
    results: dict = {"load_average_start": os.getloadavg()[0]}
    engines = {}
    for name in ENGINES:
        cmd = [sys.executable, __file__, "--engine", name, "--max-new-tokens",
               str(max_new_tokens)] + (["--threads", str(threads)] if threads else [])
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        engines[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(name, [round(r["tok_s"], 1) for r in engines[name]["rows"]], file=sys.stderr,
              flush=True)
    results.update(engines=engines, load_average_end=os.getloadavg()[0],
                   cpu=_cpu_name(), max_new_tokens=max_new_tokens)
    (OUT / "chat_speed_gguf.json").write_text(json.dumps(results, indent=2) + "\n")
    table = gguf_table(engines)
    (OUT / "chat_speed_gguf.md").write_text(
        f"{results['cpu']}; load average {results['load_average_start']:.1f} at start, "
        f"{results['load_average_end']:.1f} at end; {max_new_tokens} new tokens, greedy, "
        "one run\n\n" + table)
    print(table)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            isa = "AVX512-BF16" if "avx512_bf16" in flags else ("AVX2" if "avx2" in flags
                                                                 else "no AVX2")
            return f"{line.split(':', 1)[1].strip()} ({isa}, {os.cpu_count()} CPUs)"
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On a CPU shared with other "
                        "jobs, 1 avoids threads waiting for each other at every small op")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one precision
    parser.add_argument("--gguf", action="store_true", help="HF vs. llama.cpp engines")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # child process: one engine
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(one_engine(args.engine, args.max_new_tokens, args.threads)))
        return
    if args.gguf:
        run_gguf(args.max_new_tokens, args.threads)
        return
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
