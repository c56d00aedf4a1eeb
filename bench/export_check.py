"""Measure what `tutor export` costs in accuracy, per GGUF type, on the bundled model.

For f16, bf16, q8_0 and q4_0: export SmolLM2-135M-Instruct (no built-in check), reload the
file with transformers and compare with the fp32 source on `tutor.export.check`'s prompts
(the demo's questions in the chat template + one plain sentence): max |logit difference|,
next-token (argmax) agreement over every position, leading greedy tokens equal (of 16).
These numbers set `tutor.export.check.TOLERANCE` / `MIN_AGREEMENT`. One run; the results
are deterministic for a given transformers/gguf version (no timing is involved).

Usage: python bench/export_check.py [--types f16 bf16 q8_0 q4_0]
Writes bench/results/export_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "results"


def table(results: dict) -> str:
    from tutor.export.check import GREEDY_TOKENS, MIN_AGREEMENT, TOLERANCE

    lines = ["| type | file MiB | max \\|logit diff\\| | next-token agreement | "
             f"greedy tokens equal (of {GREEDY_TOKENS}, per question) | tolerance | "
             "min agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r in results.items():
        lines.append(f"| {kind} | {r['mib']:.1f} | {r['max_abs_diff']:.3g} | "
                     f"{r['agreement']:.3f} | {', '.join(map(str, r['greedy']))} | "
                     f"{TOLERANCE[kind]} | {MIN_AGREEMENT[kind]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["f16", "bf16", "q8_0", "q4_0"])
    args = parser.parse_args()
    from tutor.export import export_model
    from tutor.export.check import compare, load_gguf, probe_prompts
    from tutor.models import load, resolve
    from tutor.templates import get_template

    src = Path(resolve("smollm2-135m-instruct"))
    model, tok = load(src)
    template = get_template("auto", tokenizer=tok)
    old = OUT / "export_check.json"  # other types keep their last measurement
    results = json.loads(old.read_text()) if old.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types:
            path = Path(tmp) / f"smol-{kind}.gguf"
            report = export_model(model, tok, src, path, kind, template.stop_words)
            reloaded, rtok = load_gguf(path)
            check = compare(model, tok, reloaded, rtok, kind, probe_prompts(template))
            results[kind] = {"mib": report.bytes / 2**20, "max_abs_diff": check.max_abs_diff,
                             "agreement": check.agreement, "greedy": check.greedy_match,
                             "positions": check.positions, "tensor_types": report.tensor_types}
            print(kind, results[kind], flush=True)
            path.unlink()
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "export_check.json").write_text(json.dumps(results, indent=2) + "\n")
            (OUT / "export_check.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
