"""Validation loss in training, the scorer (`tutor eval`) and the forgetting probe.

Models are random 2-layer Llamas (hidden 64) with the bundled tokenizer; one of them is
fully fine-tuned (60 tiny steps) to answer every question with a planted answer, so a
keyword hit and a miss are known in advance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_lora import tiny_base

from tutor.common import IGNORE_INDEX
from tutor.errors import TutorError
from tutor.train_config import config_from_dict

ROOT = Path(__file__).resolve().parent.parent
PLANTED = "Banana bread."
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "Say hello.",
             "What is two plus two?", "Who wrote Hamlet?", "What do cows drink?",
             "Which planet is red?", "How are you?"]


def recipe(tmp_path: Path, **data) -> dict:
    base = tmp_path / "tiny"
    if not base.exists():
        tiny_base(base)
    return {
        "model": str(base), "output_dir": str(tmp_path / "run"), "lora": {"r": 8, "alpha": 16},
        "data": {"datasets": [{"path": "data/assistant.jsonl"}], "max_length": 192, **data},
        "train": {"max_steps": 4, "lr": 2e-2, "precision": "fp32", "warmup_ratio": 0.0,
                  "scheduler": "constant", "progress_bar": False},
        "save": {"steps": 0},
    }


def sample_key(s: dict) -> tuple[int, ...]:
    return tuple(s["input_ids"])


# ---------------------------------------------------------------- validation split


def test_held_out_conversations_never_reach_the_training_packs(tmp_path):
    from tiny_lora import bundled_tokenizer

    from tutor.packing import seq_lens
    from tutor.train import build_dataset, load_samples
    from tutor.train_config import DatasetSpec

    tok = bundled_tokenizer()
    cfg = config_from_dict(recipe(tmp_path, validation=0.2))
    cfg.data.datasets[0] = DatasetSpec("data/assistant.jsonl", weight=2.0)  # repeats too
    train, _ = load_samples(cfg, tok)
    val, reports = load_samples(cfg, tok, "validation")
    everything, _ = load_samples(config_from_dict(recipe(tmp_path)), tok)
    assert len(val) == reports[0].samples == round(0.2 * 136) and len(train) == 2 * (136 - 27)
    train_keys, val_keys = {sample_key(s) for s in train}, {sample_key(s) for s in val}
    assert not train_keys & val_keys
    assert train_keys | val_keys == {sample_key(s) for s in everything}
    # What is packed for training is cut back into samples: none of them is held out.
    packs, _, _ = build_dataset(cfg, tok)
    packed = []
    for p in packs.packs:
        start = 0
        for n in seq_lens(p):
            packed.append(tuple(p["input_ids"][start:start + n]))
            start += n
    assert len(packed) == len(train) and not set(packed) & val_keys
    # The draw depends on the seed only: same seed, same split; another seed, another one.
    assert [sample_key(s) for s in load_samples(cfg, tok, "validation")[0]] == \
        [sample_key(s) for s in val]
    other = config_from_dict({**recipe(tmp_path, validation=0.2), "train": {"seed": 7}})
    assert {sample_key(s) for s in load_samples(other, tok, "validation")[0]} != val_keys


def test_validation_setting_errors(tmp_path):
    from tiny_lora import bundled_tokenizer

    from tutor.train import load_samples

    tok = bundled_tokenizer()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(TutorError, match="data.validation: a fraction must be between"):
            load_samples(config_from_dict(recipe(tmp_path, validation=bad)), tok)
    with pytest.raises(TutorError, match=r"data.validation: no file 'nope.jsonl'"):
        load_samples(config_from_dict(recipe(tmp_path, validation="nope.jsonl")), tok,
                     "validation")
    with pytest.raises(TutorError, match=r"data\.validation: expected str \| float \| null"):
        config_from_dict(recipe(tmp_path, validation=[0.1]))
    assert load_samples(config_from_dict(recipe(tmp_path)), tok, "validation") == ([], [])


def test_validation_loss_is_the_training_loss_on_the_same_batch(tmp_path):
    """Trainer's eval_loss (eval mode, no grad, eval collator) is bit-for-bit the training
    loss function (train mode, Trainer.compute_loss with the batch's token count) on the
    same pack — on a QLoRA model, whose 4-bit layers must stay trainable after it."""
    import torch

    from tutor.packing import PackCollator
    from tutor.train import build_dataset, build_model, training_arguments
    from tutor.trainer import ValidationTrainer

    cfg = config_from_dict({**recipe(tmp_path, validation=0.1), "bits": 4})
    model, tok = build_model(cfg, "fp32")
    attn = model.config._attn_implementation
    val, collator, _ = build_dataset(cfg, tok, attn, model.dtype, split="validation")
    one = [val[0]]
    assert len(val) > 1 and len(val[0]["input_ids"]) > 100  # a real pack of several samples
    trainer = ValidationTrainer(
        model=model, args=training_arguments(cfg, "fp32", validate=True),
        train_dataset=one, eval_dataset=one, data_collator=collator,
        eval_collator=PackCollator(attn, tok.pad_token_id, model.dtype, keep_logits=True))
    eval_loss = trainer.evaluate()["eval_loss"]
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"
                and type(m).__module__.startswith("bitsandbytes")]
    assert four_bit and all(m.training for m in four_bit)
    model.train()
    batch = collator(one)
    n = int((batch["shift_labels"] != IGNORE_INDEX).sum())
    with torch.no_grad():
        train_loss = trainer.compute_loss(model, batch, num_items_in_batch=n)
    assert eval_loss == train_loss.item()


@pytest.mark.slow
def test_tiny_run_logs_validation_loss(tmp_path):
    from tutor.train import train

    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"question": "Hi?", "answer": "Hello.", "expected": ["x"]}))
    cfg = config_from_dict({**recipe(tmp_path, validation=0.1),
                            "train": {**recipe(tmp_path)["train"], "eval_steps": 3},
                            "evaluation": {"files": [str(probe)], "max_new_tokens": 4}})
    result = train(cfg)
    # The recipe's evaluation files, scored before and after by tutor.eval's scorer.
    assert list(result.scores) == ["before", "after"]
    before, after = (result.scores[w][0] for w in ("before", "after"))
    assert before.total == after.total == 1 and before.answer_loss != after.answer_loss
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x]
    assert [s for s, _ in evals] == [0, 3, 4]  # before, every 3 steps, after the last
    assert evals[-1][1] < evals[0][1]  # the held-out identity answers got likelier
    assert len([x for x in lines if "loss" in x]) == 4
    # The eval batches did not pass through the training collator's token counter.
    assert result.metrics["trained_tokens"] == sum(x["trained_tokens"] for x in lines
                                                   if "loss" in x and x["step"] == 4)
    assert (result.output_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- the scorer


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A tiny model fully fine-tuned (tutor.train) to answer every question with PLANTED."""
    from tutor.train import train

    tmp = tmp_path_factory.mktemp("planted")
    data = tmp / "planted.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": PLANTED}) + "\n"
                            for q in QUESTIONS))
    cfg = {**recipe(tmp), "lora": None, "output_dir": str(tmp / "model")}
    cfg["data"] = {"datasets": [{"path": str(data)}], "max_length": 64, "packing": "none"}
    cfg["train"] = {**cfg["train"], "max_steps": 60, "lr": 1e-2, "batch_size": 8}
    train(config_from_dict(cfg))
    return tmp / "model"


def test_scorer_counts_a_hit_not_a_miss_and_its_loss_is_the_training_loss(planted, tmp_path):
    import torch

    from tutor.chat import open_session
    from tutor.data import encode
    from tutor.eval import answer_loss, evaluate
    from tutor.packing import PackCollator, pack

    f = tmp_path / "probe.jsonl"
    rows = [{"question": "Who painted the Mona Lisa?", "expected": ["banana", "BREAD"]},
            {"question": "What colour is the sky?", "expected": ["cherry"]},
            {"question": "Say hello.", "answer": PLANTED, "expected": ["banana"]},
            {"question": "Hi", "answer": "Banana"}]  # no keywords: loss only, not asked
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (score,) = evaluate(str(planted), [f], max_new_tokens=8)
    answers = [s.answer for s in score.items]
    assert answers[:3] == [PLANTED] * 3 and answers[3] is None, answers
    assert [s.hit for s in score.items] == [True, False, True, None]
    assert (score.hits, score.total) == (2, 3)
    assert score.mentions(["bread"]) == 3 and score.mentions(["Pico"]) == 0
    # Answer loss: the training loss (packed sample through the training collator) on
    # each reference sample, token-weighted over the file. fp32; tolerance 1e-6.
    session = open_session(str(planted))
    model, tok = session.model, session.tokenizer
    total, n_all = 0.0, 0
    for row in rows[2:]:
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["answer"]}]
        sample = encode(messages, tok)
        batch = PackCollator("sdpa", tok.pad_token_id, keep_logits=True)(list(pack([sample], 64)))
        n = int((batch["shift_labels"] != IGNORE_INDEX).sum())
        with torch.no_grad():
            train_loss = model(**batch).loss.item()
        loss, tokens = answer_loss(model, sample)
        assert tokens == n and loss == pytest.approx(train_loss, abs=1e-6)
        total, n_all = total + train_loss * n, n_all + n
    assert score.answer_loss == pytest.approx(total / n_all, abs=1e-6)
    assert score.to_json() == {"hits": 2, "total": 3, "answer_loss": score.answer_loss}


def test_cli_eval_json_is_the_only_stdout(planted, tmp_path, capsys):
    from tutor.cli import main

    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "Say hello.", "expected": ["banana"]}) + "\n")
    assert main(["eval", str(planted), str(f), "--json", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"files": {str(f): {"hits": 1, "total": 1, "answer_loss": None}}}
    assert main(["eval", str(planted), str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err


def test_scoring_files_are_checked_with_their_line(tmp_path):
    from tutor.eval import load_items

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "expected": ["x"]}\n{"question": "b", "expected": "x"}\n')
    with pytest.raises(TutorError, match=r"bad.jsonl:2: 'expected' must be a list"):
        load_items(bad)
    bad.write_text('{"question": "", "expected": ["x"]}\n')
    with pytest.raises(TutorError, match=r"bad.jsonl:1: 'question' must be a non-empty"):
        load_items(bad)
    bad.write_text('{"text": "plain text"}\n{"question": "q", "expected": []}\n')
    items = load_items(bad)  # pretraining text: loss only; a bare question: nothing to score
    assert items[0].prompt == [] and items[0].reference is not None
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(TutorError, match="nothing to score"):
        load_items(bad)


@pytest.mark.parametrize("name", ["assistant_heldout.jsonl", "general_probe.jsonl"])
def test_shipped_scoring_files(name):
    from tutor.eval import load_items

    items = load_items(ROOT / "tutor" / "configs" / "data" / name)
    assert len(items) >= 11 and all(i.expected and i.reference for i in items)
    assert all(i.prompt[-1]["role"] == "user" for i in items)
    if name == "general_probe.jsonl":  # unrelated to the identity it is meant to probe
        text = (ROOT / "tutor" / "configs" / "data" / name).read_text().lower()
        assert "pico" not in text and "tutor lab" not in text
    # Held out means held out: no scored question is a question of the default recipe's data
    # (its replay files included), whatever the format or the case.
    from tutor.formats import iter_conversations
    from tutor.train_config import load_config, resolve_data_path

    recipe = load_config("smollm2_135m_qlora_assistant")
    trained = {m["content"].strip().lower() for spec in recipe.data.datasets
               for _, conv in iter_conversations(resolve_data_path(spec.path), spec.format)
               for m in conv if m["role"] == "user"}
    assert len(trained) > 200
    assert not {i.prompt[-1]["content"].strip().lower() for i in items} & trained


def test_batched_answers_equal_one_at_a_time_on_a_tiny_model(tmp_path):
    """Left padding must not change an answer: prompts of different lengths in one batch,
    a batch size that leaves a remainder; the tiny random model never emits <|im_end|>, so
    every row runs to max_new_tokens (rows of different lengths, then cut alike)."""
    import torch

    from tutor.chat import reply, reply_batch
    from tutor.models import load

    model, tok = load(str(tiny_base(tmp_path / "tiny")))
    torch.manual_seed(0)  # an untied random head: with the tied one it repeats its last token
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:5]]
    convs.append([{"role": "system", "content": "Be brief."}, *convs[0],
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}])
    one = [reply(model, tok, c, 12, "chatml") for c in convs]
    assert len(set(one)) > 1 and all(one)
    assert reply_batch(model, tok, convs, 12, "chatml", batch_size=4) == one


@pytest.mark.slow
def test_batched_answers_equal_one_at_a_time_on_the_bundled_model():
    """Real answers that stop at <|im_end|> at different lengths: the shipped scoring
    files, 32 new tokens (what notebook 06 scores with), fp32."""
    from tutor.chat import reply, reply_batch
    from tutor.eval import ASK_BATCH, load_items
    from tutor.models import load

    model, tok = load()
    prompts = [i.prompt for name in ("assistant_heldout.jsonl", "general_probe.jsonl")
               for i in load_items(ROOT / "tutor" / "configs" / "data" / name)]
    one = [reply(model, tok, p, 32) for p in prompts]
    assert reply_batch(model, tok, prompts, 32) == one  # batches of 16 and 11
    assert reply_batch(model, tok, prompts, 32, batch_size=ASK_BATCH) == one  # all 27 at once
