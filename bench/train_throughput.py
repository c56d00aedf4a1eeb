"""Training throughput on CPU: tutor's default vs. TRL SFTTrainer vs. plain Trainer + peft.

Same model (the bundled SmolLM2-135M-Instruct), same data, same LoRA config (r=8, alpha=16,
dropout 0.05, all linear layers), same optimiser settings (AdamW, lr 2e-4, constant schedule,
seed) and the same token budget per optimizer step (2,048: four 512-token rows when packing,
or as many padded samples as hold ~2,048 real tokens on average). The data: 400 multi-turn
conversations, each 1-4 conversations drawn (seeded) from the course's question-answer files
(assistant.jsonl, geography_qa.jsonl, raw_qa.csv) and joined: 1-6 exchanges.
Only what each framework decides differs:

  tutor            tutor.train defaults: native precision (bf16 autocast where the CPU has
                   bf16 instructions, else fp32), bfd packing with isolation,
                   no gradient checkpointing, logits only where labels are trained
  trl_wrapped      TRL's best CPU settings (bf16 where native, else fp32; use_cpu; no gradient
                   checkpointing; assistant-only loss via a ChatML template with
                   {% generation %} markers, the same trained tokens as tutor) with
                   packing_strategy="wrapped", [4, 512] rows
  trl_grouped      the same settings with padding and train_sampling_strategy=
                   "group_by_length" (TRL's other best: faster than wrapped on some CPUs)
  trl_defaults     SFTTrainer defaults (+ use_cpu=True, without which its bf16 default
                   crashes on CPU): gradient checkpointing on, padding, loss on all tokens
  trl_packing      the same with packing=True (TRL's bfd, padding-free rows)
  trainer_padding  transformers.Trainer + peft, tutor's labels, dynamic padding, native
                   precision as for trl_wrapped

"vs TRL's best" divides by the faster of trl_wrapped and trl_grouped in the same run (the
configs that train the same tokens as tutor). Each configuration runs in its own subprocess
(so peak RSS is its own), one after the other in ONE invocation; ratios are only meaningful
within a run (CPUs differ, and a shared CPU adds noise). "trained tokens" are target tokens
(label != -100 after the shift); TRL's defaults train on prompts too, so its trained = all
tokens and its loss is over a different set of tokens.

The logged training loss is not comparable either: it is one step's batch, and a packed
row without isolation (TRL's "wrapped" packing) lets every sample attend to the samples
before it. Every run therefore also saves its adapter, which one function evaluates the same
way for all (fp32, each conversation alone, loss on the answers): "isolated train loss" over
the first 100 training conversations and "held-out loss" over
tutor/configs/data/assistant_heldout.jsonl. These two columns are what "no worse loss" is judged by.

    python bench/train_throughput.py [--steps 10] [--only tutor,trl_wrapped,trl_grouped]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from tutor.common import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "tutor" / "configs" / "data"  # what the shipped recipes train on
SOURCES = ("assistant.jsonl", "geography_qa.jsonl", "raw_qa.csv")  # single-turn QA files
CONFIGS = ["tutor", "trl_wrapped", "trl_grouped", "trl_defaults", "trl_packing",
           "trainer_padding"]
TRL_BEST = ("trl_wrapped", "trl_grouped")  # same trained tokens as tutor; the faster one counts
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
MAX_LENGTH, ROWS, LR, SEED = 512, 4, 2e-4, 42
STEP_TOKENS = MAX_LENGTH * ROWS  # tokens per optimizer step, for every config
CONVERSATIONS, ISOLATED = 400, 100  # training conversations; how many score the train loss
# ChatML exactly as SmolLM2's own template renders it, with the assistant's content and
# end-of-turn marked for TRL's assistant_only_loss (the tokens tutor.data trains).
CHATML_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def conversations(n: int = CONVERSATIONS, seed: int = SEED) -> list[list[dict]]:
    """`n` multi-turn conversations, each 1-4 conversations of the QA files in SOURCES drawn
    (seeded) and joined (their system messages dropped: the template adds one)."""
    from tutor.data import load_conversations

    pool = [[m for m in messages if m["role"] != "system"]
                 for name in SOURCES for messages in load_conversations(DATA / name)["messages"]]
    rng = random.Random(seed)
    return [[m for ex in rng.sample(pool, rng.randint(1, 4)) for m in ex] for _ in range(n)]


def write_jsonl(convs: list[list[dict]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


class Counting:
    """Wraps a data collator; records real and trained (shifted label != -100) tokens per
    batch. The dataloader builds one batch ahead, so only the first `n` batches count."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def totals(self, n: int) -> tuple[int, int]:
        """(trained, all) tokens of the first `n` batches (those the optimizer consumed)."""
        done = self.batches[:n]
        return sum(b[0] for b in done), sum(b[1] for b in done)

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch.get("shift_labels", batch["labels"][..., 1:])
        mask = batch.get("attention_mask")  # padded batches: real tokens; packed rows: all
        padded = mask is not None and mask.dim() == 2
        real = int(mask.sum()) if padded else batch["input_ids"].numel()
        self.batches.append((int((labels != IGNORE_INDEX).sum()), real))
        return batch


def isolated_losses(adapter_dir: Path, train_file: Path) -> tuple[float, float]:
    """(train, held-out) loss of base + adapter: each conversation alone, fp32, token-mean
    cross-entropy over the answer tokens (labels != -100); train = the first ISOLATED
    training conversations."""
    import datasets
    import torch
    from peft import PeftModel

    from tutor.data import encode_dataset, load_conversations
    from tutor.models import load

    base, tok = load()
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    heldout = [json.loads(line) for line in (DATA / "assistant_heldout.jsonl").open()]
    sets = [load_conversations(train_file).select(range(ISOLATED)),
            datasets.Dataset.from_list(
                [{"messages": [{"role": "user", "content": h["question"]},
                               {"role": "assistant", "content": h["answer"]}]} for h in heldout])]
    results = []
    for convs in sets:
        encoded, _ = encode_dataset(convs, tok, "auto", MAX_LENGTH)
        total, count = 0.0, 0
        with torch.no_grad():
            for row in encoded:
                labels = torch.tensor([row["labels"]])
                out = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels)
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                total, count = total + out.loss.item() * n, count + n
        results.append(round(total / count, 4))
    return results[0], results[1]


def native_bf16() -> bool:
    """The peers get the precision tutor would pick here (the best one for them too)."""
    from tutor.train import resolve_precision

    return resolve_precision("auto") == "bf16"


def padded_batch_size(samples) -> int:
    """Samples per padded batch that hold STEP_TOKENS real tokens on average."""
    mean = sum(len(s["input_ids"]) for s in samples) / len(samples)
    return max(1, round(STEP_TOKENS / mean))


def peft_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")


def run_tutor(steps: int, out: Path, train_file: Path):
    from tutor.train import train
    from tutor.train_config import config_from_dict

    cfg = config_from_dict({
        "model": "smollm2-135m-instruct", "output_dir": str(out), "lora": LORA,
        "data": {"datasets": [{"path": str(train_file)}], "max_length": MAX_LENGTH},
        "train": {"max_steps": steps, "batch_size": ROWS, "lr": LR, "scheduler": "constant",
                  "warmup_ratio": 0.0, "seed": SEED, "progress_bar": False},
        "save": {"steps": 0},
    })
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    loss = [h["loss"] for h in result.log_history if "loss" in h]
    return wall, result.metrics["trained_tokens"], result.metrics["all_tokens"], loss, "answers"


def run_trl(name: str, steps: int, out: Path, train_file: Path):
    from trl import SFTConfig, SFTTrainer

    from tutor.data import encode_dataset, load_conversations
    from tutor.models import load

    model, tok = load()
    convs = load_conversations(train_file)
    encoded, _ = encode_dataset(convs, tok, "auto", MAX_LENGTH)
    kw = dict(output_dir=str(out), max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
              seed=SEED, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
              max_length=MAX_LENGTH, disable_tqdm=True)
    if name == "trl_defaults":
        kw.update(per_device_train_batch_size=padded_batch_size(encoded))
    elif name == "trl_packing":
        kw.update(packing=True, per_device_train_batch_size=ROWS)
    else:  # trl_wrapped, trl_grouped: TRL's best CPU settings
        template = out / "chatml_generation.jinja"
        out.mkdir(parents=True, exist_ok=True)
        template.write_text(CHATML_GENERATION)
        kw.update(bf16=native_bf16(), gradient_checkpointing=False, assistant_only_loss=True,
                  chat_template_path=str(template))
        if name == "trl_wrapped":
            kw.update(packing=True, packing_strategy="wrapped", per_device_train_batch_size=ROWS)
        else:
            kw.update(per_device_train_batch_size=padded_batch_size(encoded),
                      train_sampling_strategy="group_by_length")
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**kw), processing_class=tok,
        train_dataset=convs, peft_config=peft_lora(),
    )
    return _run_trainer(trainer, "all tokens" if name in ("trl_defaults", "trl_packing")
                        else "answers")


def run_padding(steps: int, out: Path, train_file: Path):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tutor.data import encode_dataset, load_conversations
    from tutor.models import load

    model, tok = load()
    encoded, _ = encode_dataset(load_conversations(train_file), tok, "auto", MAX_LENGTH)
    model = get_peft_model(model, peft_lora())
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        seed=SEED, use_cpu=True, bf16=native_bf16(), report_to=[], logging_steps=1,
        save_strategy="no", per_device_train_batch_size=padded_batch_size(encoded),
        disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator)
    return _run_trainer(trainer, "answers")


def _run_trainer(trainer, loss_on: str):
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model(trainer.args.output_dir)  # the adapter, for isolated_losses()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trained, all_tokens = counting.totals(trainer.state.global_step)  # grad_accum is 1
    return wall, trained, all_tokens, loss, loss_on


def one(name: str, steps: int) -> dict:
    """Run one configuration in this process and return its row."""
    import logging
    import tempfile

    logging.disable(logging.WARNING)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))  # the run's own: tutor refuses
    data = Path(tempfile.mkdtemp(prefix=f"bench-{name}-data-"))  # a non-empty output_dir
    train_file = write_jsonl(conversations(), data / "train.jsonl")
    run = {"tutor": run_tutor, "trainer_padding": run_padding}.get(name)
    if run is None:
        wall, trained, all_tokens, loss, loss_on = run_trl(name, steps, out, train_file)
    else:
        wall, trained, all_tokens, loss, loss_on = run(steps, out, train_file)
    from tutor.measure import peak_rss_bytes

    peak_rss = peak_rss_bytes() / 2**20  # MiB, before evaluating
    train_loss, heldout_loss = isolated_losses(out, train_file)
    return {
        "config": name, "steps": len(loss), "wall_s": round(wall, 1),
        "trained_tok_s": round(trained / wall, 1), "all_tok_s": round(all_tokens / wall, 1),
        "trained_tokens": trained, "all_tokens": all_tokens,
        "peak_rss_mib": round(peak_rss),
        "final_loss": round(loss[-1], 4), "loss_on": loss_on,
        "isolated_train_loss": train_loss, "heldout_loss": heldout_loss,
    }


def table(rows: list[dict]) -> str:
    best = max((r["trained_tok_s"] for r in rows if r["config"] in TRL_BEST), default=0)
    lines = ["| config | steps | trained tok/s | all tok/s | wall s | peak RSS MiB "
             "| last-step loss | loss on | isolated train loss | held-out loss "
             "| trained tok/s vs TRL's best |",
             "|" + " --- |" * 11]
    for r in rows:
        ratio = f"{r['trained_tok_s'] / best:.2f}×" if best else "n/a"
        lines.append(f"| {r['config']} | {r['steps']} | {r['trained_tok_s']} | {r['all_tok_s']} | "
                     f"{r['wall_s']} | {r['peak_rss_mib']} | {r['final_loss']} | {r['loss_on']} "
                     f"| {r['isolated_train_loss']} | {r['heldout_loss']} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.steps)), flush=True)
        return
    rows = run_each(__file__, args.only.split(","), ["--steps", str(args.steps)])
    save_results("train_throughput", rows, table(rows))


def run_each(script: str, names: list[str], options: list[str]) -> list[dict]:
    """Run `script --one NAME *options` in a subprocess per configuration, one after the
    other (each its own peak RSS); collect the JSON row each prints after ``ROW ``."""
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, script, "--one", name, *options],
                              cwd=ROOT, capture_output=True, text=True)
        row = next((line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")), None)
        if row is None:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(row))
        print(f"{name}: {rows[-1]}", flush=True)
    return rows


def save_results(bench: str, rows: list[dict], text: str) -> None:
    """Print the table; keep it and the rows in bench/results/, time-stamped."""
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{bench}-{stamp}.md").write_text(text + "\n")
    (RESULTS / f"{bench}-{stamp}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
