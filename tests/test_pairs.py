"""Preference pairs: reading, encoding, the packed pair layout, and its exactness."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_packing import check_packed_equals_unpacked, draw, tiny_llama
from tiny_lora import bundled_tokenizer

from tutor.data import encode, encode_pair, encode_pairs, load_pairs
from tutor.errors import TutorError
from tutor.packing import IGNORE_INDEX, collate, collator_for, pack_pairs, seq_lens
from tutor.train_config import DATA_DIR

_ = IGNORE_INDEX
USER = {"role": "user", "content": "Who made you?"}
GOOD = {"role": "assistant", "content": "The Tutor Lab made me."}
BAD = {"role": "assistant", "content": "OpenAI made me."}


def write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


def test_load_pairs_reads_every_pair_shape_into_one_form(tmp_path):
    records = [
        {"prompt": "Who made you?", "chosen": GOOD["content"], "rejected": BAD["content"]},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},  # TRL conversational
        {"messages": [USER], "chosen": GOOD["content"], "rejected": [BAD]},
        {"conversations": [{"from": "human", "value": "Who made you?"}],
         "chosen": [{"from": "gpt", "value": GOOD["content"]}], "rejected": BAD["content"]},
    ]
    ds = load_pairs(write(tmp_path, records))
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}] * 4
    assert load_pairs(ds).to_list() == ds.to_list()  # a Dataset of pairs reads as it is
    csv = tmp_path / "pairs.csv"  # flat columns: the standard (string) format
    csv.write_text('prompt,chosen,rejected\nWho made you?,"The Tutor Lab made me.",'
                   'OpenAI made me.\n')
    assert load_pairs(csv).to_list() == ds.to_list()[:1]
    system = {"prompt": "Who made you?", "system": "Be brief.", "chosen": "a", "rejected": "b"}
    assert load_pairs(write(tmp_path, [system]))["prompt"][0] == [
        {"role": "system", "content": "Be brief."}, USER]


@pytest.mark.parametrize("record, message", [
    ({"prompt": [USER, GOOD], "chosen": "a", "rejected": "b"},
     "the prompt must end with a user turn, not assistant"),
    ({"prompt": "hi", "chosen": "a", "rejected": [USER]},
     "'rejected' must hold assistant turns only (got user)"),
    ({"prompt": "hi", "chosen": "a"}, "expected a preference pair with keys prompt"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "'chosen' must be a non-empty list"),
    ({"prompt": "hi", "chosen": [{"from": "bot", "value": "x"}], "rejected": "b"},
     "chosen[0]: 'from' is 'bot'"),
])
def test_bad_pair_records_name_file_and_line(tmp_path, record, message):
    good = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    path = write(tmp_path, [good, record])
    with pytest.raises(TutorError, match=f"^{re.escape(str(path))}:2: .*{re.escape(message)}"):
        load_pairs(path)


# ---------------------------------------------------------------- encode_pair


def test_encode_pair_sides_are_encode_and_share_the_prompt_but_one_token():
    tok = bundled_tokenizer()
    pair = encode_pair([USER], [GOOD], [BAD], tok)
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        assert pair[side] == encode([USER, answer], tok)
    c, r, p = pair["chosen"], pair["rejected"], pair["prompt_length"]
    text = tok.apply_chat_template([USER], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    assert p == len(prompt) - 1  # all of the prompt but the header's last token ("\n")
    assert c["input_ids"][:p + 1] == r["input_ids"][:p + 1] == prompt
    assert c["labels"][:p + 2] == [_] * (p + 1) + [c["input_ids"][p + 1]]  # the answer starts


def test_encode_pair_does_not_train_the_prompts_own_answers():
    tok = bundled_tokenizer()
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, USER]
    pair = encode_pair(prompt, [GOOD], [BAD], tok)
    alone = encode(prompt + [GOOD], tok)
    n = pair["prompt_length"] + 1
    assert pair["chosen"]["input_ids"] == alone["input_ids"]
    assert any(t != _ for t in alone["labels"][:n])  # encode trains the earlier answer...
    assert pair["chosen"]["labels"] == [_] * n + alone["labels"][n:]  # ...a pair does not


def test_encode_pair_is_loud_about_what_cannot_be_preferred():
    tok = bundled_tokenizer()
    with pytest.raises(TutorError, match="chosen and rejected are the same tokens"):
        encode_pair([USER], [GOOD], [GOOD], tok)
    with pytest.raises(TutorError, match="^rejected: the prompt's 34 tokens are not a prefix"):
        # "assistant\n" + "  x": BPE merges "\n " into one token across the boundary
        encode_pair([USER], [GOOD], [{"role": "assistant", "content": "  OpenAI."}], tok)
    with pytest.raises(TutorError, match="chosen: 42 tokens, longer than max_length=41"):
        encode_pair([USER], [GOOD], [BAD], tok, max_length=41)


def test_encode_pairs_drops_and_counts_pairs_past_max_length(tmp_path):
    tok = bundled_tokenizer()
    long = {"role": "assistant", "content": "I was made by the Tutor Lab, " * 5}
    ds = load_pairs(write(tmp_path, [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
                                     {"prompt": [USER], "chosen": [long], "rejected": [BAD]}]))
    with pytest.warns(UserWarning, match="1 dropped as longer than max_length"):
        kept, report = encode_pairs(ds, tok, max_length=48)
    assert kept == [encode_pair([USER], [GOOD], [BAD], tok)]
    assert (report.pairs, report.kept, report.too_long) == (2, 1, ["row 1"])
    assert report.tokens == 42 + 41


# ---------------------------------------------------------------- pack_pairs


def pair(prompt: list[int], chosen: list[int], rejected: list[int], header: int = 8):
    """prompt + header (all untrained) + answer (trained), both sides; p = len(prompt)."""
    def side(answer):
        ids = prompt + [header] + answer
        return {"input_ids": ids, "labels": [_] * (len(prompt) + 1) + answer}
    return {"chosen": side(chosen), "rejected": side(rejected), "prompt_length": len(prompt)}


PICTURE = """
1 . . . . . . .
1 1 . . . . . .
1 1 1 . . . . .
1 1 1 1 . . . .
1 1 1 1 1 . . .
1 1 1 1 1 1 . .
1 1 1 . . . 1 .
1 1 1 . . . 1 1
"""


def test_pack_pairs_matches_the_docstring_picture():
    pk = pack_pairs([pair([5, 6, 7], [20, 21], [30])], 16)[0]
    assert pk["input_ids"] == [5, 6, 7, 8, 20, 21, 8, 30]
    assert pk["position_ids"] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert pk["pair_ids"] == [0] * 6 + [1] * 2
    batch = collate([pk])
    assert draw(batch["attention_mask"][0, 0]) == PICTURE
    assert batch["labels"].tolist() == [[_, _, _, _, 20, 21, _, 30]]
    doc = "\n".join(line.strip()[:15] for line in pack_pairs.__doc__.splitlines())
    assert PICTURE.strip() in doc  # the docstring draws the same mask


def test_pack_pairs_keeps_pairs_whole_counts_savings_and_drops():
    pairs = [pair([5, 6, 7], [20, 21], [30]), pair([5, 6], [40], [41, 42, 43]),
             pair(list(range(50, 70)), [20], [21]), pair([9], [22], [23])]  # the third: 43
    packs = pack_pairs(pairs, 16)  # bfd over 8, 8, (24 > 16: dropped), 5
    assert packs.dropped == 1 and packs.saved == 3 + 2 + 1
    assert [p["indices"] for p in packs] == [[0, 1], [3]] and packs.lengths == [16, 5]
    for p in packs:
        assert len(seq_lens(p)) == 2 * len(p["indices"])  # chosen + rejected span per pair
        assert p["pair_ids"] == [k for k, n in enumerate(seq_lens(p)) for _ in range(n)]
    with pytest.raises(TutorError, match="pair 0: prompt_length=4 is not a shared, untrained"):
        pack_pairs([pair([5, 6, 7], [20], [30]) | {"prompt_length": 4}], 16)
    with pytest.raises(TutorError, match="pair 0: expected a dict with chosen, rejected"):
        pack_pairs([{"chosen": {}}], 16)
    with pytest.raises(TutorError, match="pack_pairs: strategy='x'"):
        pack_pairs([], 16, strategy="x")


@pytest.mark.parametrize("impl", ["sdpa", "eager", "sdpa_varlen"])
def test_collate_numbers_pairs_batch_wide_and_pads_with_minus_one(impl):
    a, b, c = pair([5, 6, 7], [20, 21], [30]), pair([5], [40], [41]), pair([9, 9], [1], [2])
    packs = pack_pairs([a, b], 16, strategy="greedy").packs + pack_pairs([c], 16).packs
    assert [p["pair_ids"] for p in packs] == [[0] * 6 + [1] * 2 + [2] * 3 + [3] * 2,
                                              [0] * 4 + [1] * 2]
    got = collate(packs, impl)["pair_ids"].tolist()
    if impl in ("sdpa", "eager"):  # one row per pack, right-padded
        assert got == [packs[0]["pair_ids"], [4] * 4 + [5] * 2 + [-1] * 7]
    else:  # the flattened varlen row
        assert got == [packs[0]["pair_ids"] + [4] * 4 + [5] * 2]
    with pytest.raises(TutorError, match="some packs hold pairs"):
        collate([packs[0], {k: packs[1][k] for k in ("input_ids", "labels", "position_ids")}])
    with pytest.raises(TutorError, match="pair packs need one of sdpa, eager, sdpa_varlen"):
        collate(packs, "flash_attention_2")


# ---------------------------------------------------------------- exactness


def random_pairs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):
        return torch.randint(3, 128, (int(torch.randint(lo, hi, (1,), generator=g)),),
                             generator=g).tolist()
    return [pair(tokens(3, 16), tokens(1, 10), tokens(1, 10), header=int(tokens(1, 2)[0]))
            for _ in range(n)]


def sides(pairs: list[dict], packs) -> tuple[list[dict], list[dict]]:
    """Chosen and rejected of every pair as samples 2i, 2i+1, and packs naming them so
    (the spans of a pair pack, in order), for `check_packed_equals_unpacked`."""
    samples = [s for q in pairs for s in (q["chosen"], q["rejected"])]
    renamed = [p | {"indices": [2 * i + k for i in p["indices"] for k in (0, 1)]} for p in packs]
    return samples, renamed


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L-1) log-probability of each next label (0 where the label is -100)."""
    targets = labels[:, 1:]
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != _)


def check_pair_logps(model, pairs, packs, collate_fn, tol):
    """Per-token log-probabilities of each side's labels, and their sums grouped by
    pair_ids, equal prompt + chosen / prompt + rejected run alone (within `tol`)."""
    batch = collate_fn(packs)
    pair_ids = batch.pop("pair_ids")
    logps = token_logps(model(**batch).logits, batch["labels"])  # (B, L-1)
    seq = pair_ids[:, 1:]  # the sequence of each target (a span's first label is -100)
    trained = batch["labels"][:, 1:] != _
    n_seq = int(pair_ids.max()) + 1
    sums = torch.zeros(n_seq, dtype=logps.dtype).index_add_(0, seq[trained], logps[trained])
    order = [(i, s) for p in packs for i in p["indices"] for s in ("chosen", "rejected")]
    assert len(order) == n_seq
    for k, (i, s) in enumerate(order):
        alone = pairs[i][s]
        labels = torch.tensor([alone["labels"]])
        want = token_logps(model(input_ids=torch.tensor([alone["input_ids"]])).logits, labels)
        want = want[labels[:, 1:] != _]
        got = logps[trained & (seq == k)]
        assert got.shape == want.shape and (got - want).abs().max() < tol, (i, s)
        assert abs(sums[k] - want.sum()) < tol * len(want), (i, s)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "sdpa_varlen"])
@torch.no_grad()
def test_tiny_llama_pair_logps_equal_each_side_alone(impl):
    """Several pairs per pack, two packs per batch: every token's log-probability (fp32, 1e-5)
    and every sequence's sum equal those of prompt + answer alone, unpacked."""
    model = tiny_llama(impl)
    pairs = random_pairs(10, seed=2)
    packs = pack_pairs(pairs, 64, seed=0)
    assert len(packs) >= 2 and all(len(p["indices"]) >= 2 for p in packs[:2])
    assert packs.saved == sum(q["prompt_length"] for q in pairs)
    check_pair_logps(model, pairs, packs[:2], collator_for(model), 1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "sdpa_varlen"])
def test_tiny_llama_pair_packs_loss_logits_and_grads_equal_sides_alone(impl):
    """The whole model: loss, every logit of every span and every weight's gradient."""
    model = tiny_llama(impl)
    pairs = random_pairs(8, seed=5)
    samples, packs = sides(pairs, pack_pairs(pairs, 64, seed=1)[:2])
    collator = collator_for(model)
    check_packed_equals_unpacked(model, samples, packs,
                                 lambda ps: {k: v for k, v in collator(ps).items()
                                             if k != "pair_ids"}, 1e-5, 1e-4, grad_tol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_bundled_model_pair_logps_equal_each_side_alone_on_pico_pairs(bundled):
    """Pico's pairs with the real template, sdpa_varlen as `tutor train` runs on a CPU."""
    from tutor.attention import register

    model, tokenizer = bundled
    ds = load_pairs(DATA_DIR / "pico_pairs.jsonl")
    pairs, report = encode_pairs(ds.select(range(8)), tokenizer)
    assert report.kept == 8
    packs = [p for p in pack_pairs(pairs, 256, seed=0) if len(p["indices"]) >= 2]
    assert [len(p["indices"]) for p in packs] == [3, 2, 3]  # 8 pairs, 35-38 prompt tokens each
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        check_pair_logps(model, pairs, packs, collator_for(model), 1e-4)
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------- Pico's pairs


def user_turns(path) -> set[str]:
    from tutor.data import load_conversations

    return {m["content"].strip().lower() for conv in load_conversations(path)["messages"]
            for m in conv if m["role"] == "user"}


def test_pico_pairs_are_clean_and_the_heldout_ones_never_trained_or_scored():
    from tutor.course.pico_dpo import LIMIT
    from tutor.train_config import load_config, resolve_data_path

    tok = bundled_tokenizer()
    train, heldout = (load_pairs(DATA_DIR / f"{n}.jsonl") for n in ("pico_pairs",
                                                                     "pico_pairs_heldout"))
    assert (len(train), len(heldout)) == (80, 20)
    prompts = {n: [p[-1]["content"].strip().lower() for p in ds["prompt"]]
               for n, ds in (("train", train), ("heldout", heldout))}
    assert all(len(set(v)) == len(v) for v in prompts.values())  # no duplicate prompt
    sft = load_config("smollm2_135m_qlora_assistant")
    seen = set(prompts["train"])
    for path in [d.path for d in sft.data.datasets] + sft.evaluation.files:
        seen |= user_turns(resolve_data_path(path))
    assert not seen & set(prompts["heldout"])  # never trained on, never scored elsewhere
    scored = (user_turns(DATA_DIR / "assistant_heldout.jsonl")
              | user_turns(DATA_DIR / "general_probe.jsonl"))
    assert not scored & set(prompts["train"])  # no scored question is trained on
    for ds in (train, heldout):
        pairs, report = encode_pairs(ds, tok)  # every pair encodes (no error, nothing dropped)
        assert report.kept == len(ds)
        for row, q in zip(ds, pairs, strict=True):
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert chosen.count(". ") <= 1 and rejected.count(". ") <= 1  # one or two sentences
            # the sides differ in behaviour, not in length: a long rejected answer would be
            # dispreferred for its length alone (summed log-probs)
            assert abs(len(q["rejected"]["input_ids"]) - len(q["chosen"]["input_ids"])) <= 10
            assert LIMIT.search(chosen) and not LIMIT.search(rejected), row  # admits a limit
            # rejected: a confident made-up answer, never Pico's identity line (which is right
            # for identity questions: pairs against it would teach Pico to forget its name)
            assert "Pico" not in rejected and "Tutor Lab" not in rejected, row


def test_with_system_prompts_opens_each_prompt_once():
    """The recipe's system prompt goes first in every pair's prompt that has none; a prompt
    with its own system turn keeps it; None changes nothing. Answers are untouched."""
    import datasets

    from tutor.data import with_system_prompts

    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = [{"role": "user", "content": "Who are you?"}]
    answer = [{"role": "assistant", "content": "Pico."}]
    pairs = datasets.Dataset.from_dict({"prompt": [own, plain], "chosen": [answer, answer],
                                        "rejected": [answer, answer]})
    out = with_system_prompts(pairs, "You are Pico.")
    assert out["prompt"] == [own, [{"role": "system", "content": "You are Pico."}, *plain]]
    assert out["chosen"] == pairs["chosen"] and out["rejected"] == pairs["rejected"]
    assert with_system_prompts(pairs, None) is pairs
