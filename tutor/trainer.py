"""The Trainer that trains: tutor's training loss, and validation loss in Trainer's own loop.

`ValidationTrainer` is the one `transformers.Trainer` subclass. Its training loss is the
model's own, or with ``train.loss_chunk`` the chunked loss of `tutor.chunked_loss` (answers
only, without [tokens, vocab] logits).

The validation split (`tutor.train.load_samples(cfg, tok, "validation")`: a file, or
conversations held out of the training data before packing) is packed like the training
data and collated by a second `tutor.packing.PackCollator`, so ``eval_loss`` is the training loss
function on data the model never trains on: answers only, samples isolated inside packs.
Trainer evaluates it before the first step (``eval_on_start``), every
``train.eval_steps`` steps, and — through `EvaluateAtEnd` — after the last step; each
result is one ``eval_loss`` line in metrics.jsonl and in the progress output.

Two details Trainer cannot know about:

- The eval batches must not pass through the *training* collator, whose token counts
  feed `ThroughputCallback` (they would be counted as trained tokens).
- Trainer switches the model to eval mode. A bitsandbytes 4-bit layer in eval mode on a
  CPU with AVX512-BF16 repacks its weight into an inference-only layout with no backward,
  so training after the evaluation would get no gradient through the frozen base;
  `tutor.models.keep_4bit_trainable` puts those layers back in train mode (it changes
  nothing else about them: they have no dropout).

Not handled: keeping the best checkpoint by validation loss (the curve in metrics.jsonl
and loss.png shows where it was; `save.steps` keeps the checkpoints to choose from),
generation-based metrics during training (`tutor.eval` scores answers after training).
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from tutor.chunked_loss import causal_lm_loss
from tutor.models import keep_4bit_trainable


class ValidationTrainer(Trainer):
    """`Trainer` whose evaluation batches use `eval_collator` and keep 4-bit layers trainable.

    `loss_chunk`: rows per chunk of `tutor.chunked_loss` (the loss over trained positions
    without [tokens, vocab] logits), for training and evaluation alike; None = the model's
    own loss.
    """

    def __init__(self, *args: Any, eval_collator: Any = None, loss_chunk: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.loss_chunk = loss_chunk

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.loss_chunk is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Trainer's own rules, as for a model that takes num_items_in_batch: the loss is
        # sum / num_items_in_batch (then already scaled for gradient accumulation), and
        # multiplied back by the processes when tokens are averaged across devices.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = causal_lm_loss(model, inputs, items, self.loss_chunk)
        if self.args.average_tokens_across_devices and items is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:  # the DataLoader binds its collate_fn when it is built
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool,
                        ignore_keys: Any = None) -> Any:
        keep_4bit_trainable(model)  # after Trainer's model.eval(), before the forward
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


class EvaluateAtEnd(TrainerCallback):
    """Ask Trainer for an evaluation after the last optimizer step, whatever eval_steps is."""

    def on_step_end(self, args, state, control, **kw):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_evaluate = True


def best_eval(log_history: list[dict[str, Any]]) -> tuple[int, float] | None:
    """(step, eval_loss) of the lowest validation loss logged, or None when none was."""
    points = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return min(points, key=lambda p: p[1]) if points else None
