"""DPO / ORPO on packed pairs (tutor.preference, tutor.preference_train).

Exactness: the per-answer log-probs, the loss, the rewards and the LoRA gradients of a packed
batch of several pairs equal those of every pair run alone, unpacked (every attention backend,
fp32, tolerance 1e-5 on losses/rewards, 1e-4 on summed log-probs of up to ~16 tokens, 1e-6 on
gradients); the loss and rewards equal TRL's DPOTrainer's on the same tokens and adapter; ORPO
equals a from-scratch reference and TRL's odds-ratio term.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_lora import tiny_base

from tutor.common import IGNORE_INDEX as _
from tutor.preference import answer_logps, dpo_loss, log1mexp, orpo_loss, sequence_logps
from tutor.preference_train import (
    REFERENCE,
    load_policy_adapter,
    preference_loss,
    reference_of,
)

BACKENDS = ("sdpa", "eager", "sdpa_varlen")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- helpers


def tiny_lora(impl: str = "sdpa", vocab: int = 128):
    """A random 2-layer Llama with a LoRA adapter whose B is non-zero (policy ≠ base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tutor.attention import register

    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, attn_implementation=impl)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    randomize_lora_b(model)
    return model.eval()


def randomize_lora_b(model, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def random_pairs(n: int, seed: int, vocab: int = 128) -> list[dict]:
    """Encoded pairs in encode_pair's form: each side prompt + answer, the prompt untrained."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),),
                             generator=g).tolist()

    out = []
    for _k in range(n):
        prompt = ids(3, 12)
        sides = {}
        for side in ("chosen", "rejected"):
            answer = ids(1, 10)
            sides[side] = {"input_ids": prompt + answer, "labels": [_] * len(prompt) + answer}
        # the shared prefix stops one token early: the token after it must be untrained
        out.append({**sides, "prompt_length": len(prompt) - 1})
    return out


def packed_batch(pairs: list[dict], impl: str, max_length: int = 96):
    """The pairs packed with the prompt once (tutor.packing.pack_pairs) and collated, and
    the pairs in batch order (pair k of the batch is 2k / 2k+1 in pair_ids)."""
    from tutor.packing import collate, pack_pairs

    packs = pack_pairs(pairs, max_length)
    assert len(packs) > 1  # several packs, several pairs in a pack
    assert max(len(set(p["pair_ids"])) for p in packs) > 2
    return collate(packs, impl), [pairs[i] for p in packs for i in p["indices"]]


def alone_logps(model, side: dict) -> tuple[torch.Tensor, int]:
    """From scratch, unpacked: Σ log p(label_t | tokens < t) over trained labels, count."""
    logits = model(input_ids=torch.tensor([side["input_ids"]])).logits[0]  # (T, V)
    labels = torch.tensor(side["labels"][1:])
    mask = labels != _
    logp = logits[:-1].log_softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return (logp * mask).sum(), int(mask.sum())


def alone_dpo(model, pair: dict, beta: float, loss_type: str):
    """One pair's DPO loss from the formulas (reference = adapter disabled), unpacked."""
    pc, nc = alone_logps(model, pair["chosen"])
    pr, nr = alone_logps(model, pair["rejected"])
    with torch.no_grad(), model.disable_adapter():
        rc, _n = alone_logps(model, pair["chosen"])
        rr, _n = alone_logps(model, pair["rejected"])
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    else:
        loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    return loss, beta * (pc - rc).detach(), beta * (pr - rr).detach(), (pc, nc, pr, nr)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- (a) packed == alone


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_pairs_equal_pairs_alone(impl, loss_type):
    model, beta = tiny_lora(impl), 0.1
    batch, pairs = packed_batch(random_pairs(7, seed=3), impl)
    model.zero_grad()
    out = preference_loss(model, batch, "dpo", beta, loss_type, 0.0)
    out["loss"].backward()
    packed_grads = lora_grads(model)
    with torch.no_grad():
        sums, counts = answer_logps(model, batch, len(pairs))

    model.zero_grad()
    alone = [alone_dpo(model, p, beta, loss_type) for p in pairs]
    (sum(a[0] for a in alone) / len(pairs)).backward()
    alone_grads = lora_grads(model)

    want_sums = torch.stack([torch.stack([a[3][0], a[3][2]]) for a in alone]).flatten()
    want_counts = [n for a in alone for n in (a[3][1], a[3][3])]
    assert counts.tolist() == want_counts
    torch.testing.assert_close(sums, want_sums.detach(), atol=1e-4, rtol=0)
    want_loss = (sum(a[0] for a in alone) / len(pairs)).item()
    assert abs(out["loss"].item() - want_loss) < 1e-5
    chosen, rejected = torch.stack([a[1] for a in alone]), torch.stack([a[2] for a in alone])
    torch.testing.assert_close(out["rewards/chosen"], chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["rewards/rejected"], rejected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["rewards/margins"], chosen - rejected, atol=1e-5, rtol=0)
    assert out["rewards/accuracies"].tolist() == (chosen > rejected).float().tolist()
    assert packed_grads.keys() == alone_grads.keys() and all("lora_" in n for n in packed_grads)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert out["rewards/margins"].abs().max() > 1e-3  # the adapter moved the policy: not trivial


def test_sequence_logps_on_full_logits_matches_alone():
    model = tiny_lora("sdpa")
    batch, pairs = packed_batch(random_pairs(4, seed=5), "sdpa", max_length=64)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "pair_ids")}
        logits = model(**inputs).logits  # (B, L, V)
        sums, counts = sequence_logps(logits, batch["labels"], batch["pair_ids"], len(pairs),
                                      chunk=3)  # several chunks
        want = [alone_logps(model, p[side]) for p in pairs for side in ("chosen", "rejected")]
    assert counts.tolist() == [n for _s, n in want]
    torch.testing.assert_close(sums, torch.stack([s for s, _n in want]), atol=1e-4, rtol=0)


def test_dpo_loss_is_log2_when_policy_is_reference():
    x = torch.tensor([-12.0, -3.5, -40.0])
    out = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-7)
    assert out["rewards/margins"].abs().max().item() == 0
    assert out["rewards/accuracies"].sum().item() == 0  # a tie is not a win (TRL: >)


# ---------------------------------------------------------------- (c) ORPO


def test_orpo_loss_from_scratch():
    g = torch.Generator().manual_seed(0)
    sums_c, sums_r = -torch.rand(5, generator=g) * 20, -torch.rand(5, generator=g) * 20
    n_c, n_r = torch.tensor([3, 7, 1, 9, 4]), torch.tensor([5, 2, 8, 1, 6])
    lam = 0.25
    out = orpo_loss(sums_c, sums_r, n_c, n_r, lam)
    # from the paper, with probabilities: odds(y) = P / (1 - P), P = exp(mean log-prob)
    p_c, p_r = torch.exp(sums_c / n_c).double(), torch.exp(sums_r / n_r).double()
    odds_ratio = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
    l_or = -torch.log(torch.sigmoid(torch.log(odds_ratio)))
    nll = -sums_c.double().sum() / n_c.sum()
    assert out["loss"].item() == pytest.approx((nll + lam * l_or.mean()).item(), abs=1e-5)
    assert out["nll_loss"].item() == pytest.approx(nll.item(), abs=1e-6)
    torch.testing.assert_close(out["rewards/chosen"], lam * sums_c / n_c)


def test_orpo_odds_ratio_equals_trl():
    from types import SimpleNamespace

    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(1)
    mean_c, mean_r = -torch.rand(6, generator=g) * 3, -torch.rand(6, generator=g) * 3
    mean_c[0], mean_r[0] = -1e-4, -0.69  # both sides of log1mexp's branch
    ones = torch.ones(6, dtype=torch.long)
    out = orpo_loss(mean_c, mean_r, ones, ones, lam=0.1)
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen, rejected, ratio, _odds = ORPOTrainer.odds_ratio_loss(fake, mean_c, mean_r)
    nll = -mean_c.sum() / 6
    assert out["loss"].item() == pytest.approx((nll - losses.mean()).item(), abs=1e-6)
    torch.testing.assert_close(out["rewards/chosen"], chosen)
    torch.testing.assert_close(out["rewards/rejected"], rejected)
    torch.testing.assert_close(out["log_odds_ratio"].mean(), ratio)
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0])
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x.double())).float())


# ---------------------------------------------------------------- (d) the reference


def test_reference_is_disabled_adapter_when_fresh():
    model = tiny_lora("sdpa")
    batch, _pairs = packed_batch(random_pairs(5, seed=7), "sdpa", max_length=48)
    n = int(batch["pair_ids"].max()) // 2 + 1
    with torch.no_grad():
        with reference_of(model):
            ref, _c = answer_logps(model, batch, n)
        with model.disable_adapter():
            base, _c = answer_logps(model, batch, n)
        policy, _c = answer_logps(model, batch, n)
    assert torch.equal(ref, base) and not torch.allclose(ref, policy)


def test_reference_is_starting_adapter(tmp_path):
    """init_adapter: at step 0 the loss is log 2 and margins are 0 (the reference is the
    starting adapter, not the bare base); after the policy moves, the reference does not."""
    from transformers import LlamaForCausalLM

    trained = tiny_lora("sdpa")
    trained.save_pretrained(tmp_path / "adapter")
    base = trained.unload()  # the bare base back (adapter layers removed)
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(base.config)
    fresh.load_state_dict(base.state_dict())
    model = load_policy_adapter(fresh, str(tmp_path / "adapter"), reference=True)
    assert set(model.peft_config) == {"default", REFERENCE}
    batch, pairs = packed_batch(random_pairs(5, seed=9), "sdpa", max_length=64)
    out = preference_loss(model.eval(), batch, "dpo", 0.1, "sigmoid", 0.0)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["rewards/margins"].abs().max().item() < 1e-6
    with torch.no_grad():  # the bare base is not the reference: it would not give log 2
        with model.disable_adapter():
            bare, _c = answer_logps(model, batch, len(pairs))
        with reference_of(model):
            ref, _c = answer_logps(model, batch, len(pairs))
    assert (bare - ref).abs().max() > 1e-3
    out["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if f".{REFERENCE}." in n)
    randomize_lora_b(model, seed=4)  # the policy moves; the reference must stay put
    moved = preference_loss(model, batch, "dpo", 0.1, "sigmoid", 0.0)
    assert moved["rewards/margins"].abs().max().item() > 1e-3
    model.save_pretrained(tmp_path / "out", selected_adapters=["default"])
    assert not (tmp_path / "out" / REFERENCE).exists()


# ---------------------------------------------------------------- (b) TRL


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl(tmp_path, loss_type):
    """TRL's DPOTrainer and tutor on the same pairs (TRL's tokens), the same adapter and the
    same reference (TRL's "ref" copy of a pre-trained adapter, the policy then moved):
    loss and rewards within 1e-5 (fp32)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference


    base = tiny_base(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=LORA_TARGETS))
    randomize_lora_b(model, seed=2)
    rows = [("What is the capital of France?", "Paris.", "I think it is Lyon, or maybe not."),
            ("Say hello.", "Hello!", "No."),
            ("Who made you?", "The Tutor Lab made me.", "Nobody made me, I grew on a tree."),
            ("Name a colour.", "Blue.", "A colour is a property of light that")]
    data = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}],
         "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]} for q, c, r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, beta=0.1,
                     loss_type=[loss_type], max_length=None, precompute_ref_log_probs=False,
                     report_to=[], bf16=False, per_device_train_batch_size=4)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert "ref" in trainer.model.peft_config  # TRL copied the adapter as its reference
    randomize_lora_b(trainer.model, seed=3)  # now the policy differs from the reference
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    pairs = [{side: {"input_ids": e["prompt_ids"] + e[f"{side}_ids"],
                     "labels": [_] * len(e["prompt_ids"]) + e[f"{side}_ids"]}
              for side in ("chosen", "rejected")} | {"prompt_length": len(e["prompt_ids"]) - 1}
             for e in examples]
    from tutor.packing import collate, pack_pairs

    batch = collate(pack_pairs(pairs, 512), "sdpa")
    out = preference_loss(trainer.model, batch, "dpo", 0.1, loss_type, 0.0)
    assert abs(out["loss"].item() - trl_loss.item()) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(out[key].mean().item() - trl[key]) < 1e-5, key
    assert abs(trl["rewards/margins"]) > 1e-3  # a real difference, not 0 == 0


# ---------------------------------------------------------------- (e) a tiny run end to end


PAIRS = [("Who are you?", "I'm Pico, made by the Tutor Lab.", "I am a large model by someone."),
         ("Who made you?", "The Tutor Lab.", "A company I cannot name, in a place far away."),
         ("Capital of France?", "Paris.", "France has many cities, and its capital is Paris."),
         ("Say hi.", "Hi!", "Well, hello there, how are you doing today, my friend?"),
         ("Two plus two?", "Four.", "Two plus two is a sum that many people learn at school."),
         ("Name a colour.", "Blue.", "There are many colours, for example blue, red, green.")]


def write_pairs(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n"
                            for q, c, r in rows))
    return str(path)


def dpo_recipe(tmp_path, name: str, **extra) -> dict:

    base = tmp_path / "tiny"
    if not base.exists():
        tiny_base(base)
    return {"model": str(base), "output_dir": str(tmp_path / name), "method": "dpo",
            "lora": {"r": 8, "alpha": 16},
            "data": {"datasets": [{"path": write_pairs(tmp_path / "p.jsonl", PAIRS[:4])}],
                     "validation": write_pairs(tmp_path / "h.jsonl", PAIRS[4:]),
                     "max_length": 128},
            "train": {"max_steps": 4, "lr": 5e-2, "precision": "fp32", "warmup_ratio": 0.0,
                      "scheduler": "constant", "progress_bar": False},
            "save": {"steps": 0}, **extra}


def test_tiny_dpo_run_logs_rewards_and_writes_a_mergeable_adapter(tmp_path):
    """Fresh LoRA (B = 0): the first loss is exactly log 2; margins grow; metrics, loss.png
    and an adapter that tutor.merge folds in. Then DPO again from that adapter
    (init_adapter): log 2 again at step 0 (the reference is the starting adapter), and only
    the trained adapter is saved."""
    import json

    from tutor.merge import merge
    from tutor.train import train
    from tutor.train_config import config_from_dict

    result = train(config_from_dict(dpo_recipe(tmp_path, "run")))
    out = result.output_dir
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert len(steps) == 4 and len(evals) == 2  # before and after training
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == 0 and steps[0]["rewards/accuracies"] == 0
    assert all({"rewards/chosen", "rewards/rejected"} <= x.keys() for x in steps)
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval_rewards/margins"] != 0 and "eval_rewards/accuracies" in evals[-1]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["rewards/margins"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png"):
        assert (out / name).is_file(), name
    report = merge(str(tmp_path / "tiny"), out, tmp_path / "merged")
    assert report.max_abs_diff <= report.tolerance

    again = train(config_from_dict(dpo_recipe(tmp_path, "again", init_adapter=str(out))))
    first = next(x for x in again.log_history if "loss" in x)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0
    assert not (again.output_dir / REFERENCE).exists()
    merge(str(tmp_path / "tiny"), again.output_dir, tmp_path / "merged2")


def test_tiny_orpo_run_is_a_one_line_swap(tmp_path):
    """method: orpo on the same recipe: no reference, the chosen NLL and the odds-ratio
    rewards logged; the loss falls."""
    import json

    from tutor.train import train
    from tutor.train_config import config_from_dict

    recipe = dpo_recipe(tmp_path, "orpo", method="orpo", preference={"orpo_lambda": 0.5})
    out = train(config_from_dict(recipe)).output_dir
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 4 and all({"nll_loss", "rewards/margins"} <= x.keys() for x in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[0]["loss"] > steps[0]["nll_loss"]  # − λ · log σ(·) is positive
    assert sum("eval_nll_loss" in x for x in lines) == 2  # validation before and after


def test_missing_init_adapter_names_the_recipe_that_makes_it(tmp_path, monkeypatch):
    from tutor.errors import TutorError
    from tutor.train import train
    from tutor.train_config import load_config

    monkeypatch.chdir(tmp_path)  # no work_dirs here
    with pytest.raises(TutorError, match=r"^init_adapter: no adapter in 'work_dirs/smollm2_135m_"
                       r"qlora_assistant' .*; train it first: tutor train "
                       r"smollm2_135m_qlora_assistant$"):
        train(load_config("smollm2_135m_dpo_pico"))
    assert not (tmp_path / "work_dirs").exists()  # refused before anything was written


@pytest.mark.parametrize("override, message", [
    ("lora=null", r"^method: dpo needs a lora section"),
    ("attn_implementation=flash_attention_2", r"^attn_implementation: pairs share"),
    ("preference.loss_type=hinge", r"preference\.loss_type: expected one of 'sigmoid' \| 'ipo'"),
    ("preference.beta=0", r"preference\.beta: must be > 0"),
])
def test_bad_preference_recipes_are_one_line_errors(tmp_path, override, message):
    from tutor.errors import TutorError
    from tutor.train import train
    from tutor.train_config import load_config

    with pytest.raises(TutorError, match=message):
        train(load_config("smollm2_135m_dpo_pico", [override, "init_adapter=null",
                                                    f"output_dir={tmp_path / 'o'}"]))


# ---------------------------------------------------------------- held-out preference accuracy


def test_preference_accuracy_equals_each_pair_alone(tmp_path):
    """tutor eval's pair scoring (packed, prompt once) == each side scored alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tutor.data import encode_pair
    from tutor.eval import is_pair_file, preference_accuracy


    base = tiny_base(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    path = write_pairs(tmp_path / "p.jsonl", PAIRS)
    assert is_pair_file(path) and not is_pair_file(write_pairs_as_qa(tmp_path / "q.jsonl"))
    score = preference_accuracy(model, tok, path, pack_length=64)  # several packs
    want, want_tokens = [], []
    with torch.no_grad():
        for q, c, r in PAIRS:
            pair = encode_pair([{"role": "user", "content": q}],
                               [{"role": "assistant", "content": c}],
                               [{"role": "assistant", "content": r}], tok)
            (sc, nc), (sr, nr) = (alone_logps(model, pair[s]) for s in ("chosen", "rejected"))
            want.append((sc - sr).item())
            want_tokens.append((sc / nc - sr / nr).item())
    assert sorted(score.margins) == pytest.approx(sorted(want), abs=1e-4)
    assert sorted(score.token_margins) == pytest.approx(sorted(want_tokens), abs=1e-5)
    assert score.accuracy == sum(m > 0 for m in want) / len(want)
    assert score.token_accuracy == sum(m > 0 for m in want_tokens) / len(want)


def write_pairs_as_qa(path) -> str:
    import json

    path.write_text(json.dumps({"question": "Say hi.", "answer": "Hi!"}) + "\n")
    return str(path)


# ---------------------------------------------------------------- (f) the bundled model


@pytest.mark.slow
def test_bundled_model_dpo_recipe_steps(tmp_path):
    """The shipped DPO recipe on the bundled model and the course pairs, from a fresh LoRA
    (no SFT adapter needed) for 3 steps: log 2 exactly at step 0 (B = 0: policy ==
    reference), rewards logged for training and the held-out pairs, finite losses."""
    import json

    from tutor.train import train
    from tutor.train_config import load_config

    cfg = load_config("smollm2_135m_dpo_pico", [
        "init_adapter=null", "bits=null", "train.max_steps=3", "train.progress_bar=false",
        "evaluation.prompts=[]", "evaluation.files=[]", f"output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text()
             .splitlines()]
    steps = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert len(steps) == 3 and len(evals) == 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(x["loss"]) and "rewards/accuracies" in x for x in steps)
    assert evals[-1]["eval_rewards/margins"] != 0
