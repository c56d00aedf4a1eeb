"""Test helpers: tiny base models and real Trainer checkpoints with a peft LoRA adapter.

Checkpoints are made the way training makes them (transformers.Trainer + peft), so
`tutor convert` / `tutor merge` are tested on the real file layout, plus the
`tutor_config.yaml` that tutor's training writes beside them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tutor.common import CONFIG_FILE
from tutor.models import ensure_bundled

QUESTIONS = ["What is the capital of France?", "Name a primary colour.",
             "What is two plus two?", "Say hello."]


def bundled_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_bundled())


def tiny_base(path: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer Llama with the bundled tokenizer (ChatML), saved to `path`."""
    from tutor.course.tiny_model import tiny_llama

    return tiny_llama(path, hidden, layers, seed)


def train_checkpoint(base: str | Path, output: Path, steps: int = 2, lr: float = 1e-2,
                     model_name: str | None = None, template: str = "chatml") -> Path:
    """Train a LoRA (r=4, all attention+MLP projections) for `steps`; return checkpoint dir.

    Writes `tutor_config.yaml` (keys model, template) into OUTPUT and the checkpoint,
    as tutor's training does. A high learning rate makes LoRA B clearly non-zero.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    tok = bundled_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    texts = [tok.apply_chat_template([{"role": "user", "content": q},
                                      {"role": "assistant", "content": "Banana."}], tokenize=False)
             for q in QUESTIONS]
    enc = tok(texts, padding="max_length", max_length=48, add_special_tokens=False)
    data = [{"input_ids": ids, "attention_mask": m, "labels": ids}
            for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    args = TrainingArguments(output_dir=str(output), max_steps=steps, learning_rate=lr,
                             per_device_train_batch_size=2, save_steps=steps, report_to=[],
                             use_cpu=True, logging_steps=steps, disable_tqdm=True,
                             save_only_model=False)
    Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = output / f"checkpoint-{steps}"
    cfg = {"model": model_name or str(base), "template": template}
    for folder in (output, checkpoint):
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    return checkpoint


