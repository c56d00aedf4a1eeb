"""`tutor demo`: the whole practice on a tiny budget, OUT handling, before/after scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_lora import tiny_base

from tutor.demo import IDENTITY, MARKER, prepare_out, run_practice, score_table
from tutor.errors import TutorError
from tutor.eval import FileScore, Item, ItemScore

STAGES = ["score the base model", "train", "convert", "merge", "score the merged model",
          "export", "chat with the exported file"]


@pytest.mark.slow
def test_practice_on_a_tiny_budget_writes_every_stage(tmp_path, capsys):
    """The real recipe (QLoRA, packing, convert, merge with its logits check) for two
    optimizer steps on a random 2-layer Llama with the bundled tokenizer: what is checked
    is that every stage runs and leaves its artifact, not what a model learns (the full
    demo on the bundled model is run by hand: it takes minutes)."""
    base = tiny_base(tmp_path / "tiny")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"question": "Who built you?", "expected": ["Tutor Lab"]}) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"question": "What is the capital of France?",
                                 "answer": "Paris.", "expected": ["Paris"]}) + "\n")
    out = tmp_path / "demo"
    s = run_practice(out, overrides=[f"model={base}", "train.max_steps=2"],
                     heldout=heldout, probe=probe, max_new_tokens=8)
    assert s["base_model"] == str(base)
    assert [r["stage"] for r in s["stages"]] == STAGES
    assert all(r["seconds"] >= 0 for r in s["stages"]) and s["total_seconds"] > 0
    rss = [r["peak_rss_mib"] for r in s["stages"]]
    assert rss == sorted(rss) and rss[0] > 100  # a high-water mark (torch alone is ~300 MiB)
    assert s["total_seconds"] == pytest.approx(sum(r["seconds"] for r in s["stages"]), abs=0.2)
    assert s["train"]["steps"] == 2 and s["train"]["trained_tok_s"] > 0
    assert s["merge"]["max_abs_diff"] <= s["merge"]["tolerance"] == 1e-3
    scores = s["scores"]
    assert list(scores) == [str(heldout), str(probe)]
    for row in scores.values():
        assert [row[w]["total"] for w in ("before", "after")] == [1, 1]
    assert scores[str(heldout)]["before"]["answer_loss"] is None  # no reference answer
    assert all(scores[str(probe)][w]["answer_loss"] > 0 for w in ("before", "after"))
    # The recipe's validation fraction cannot hold out of 1 probe row, but of the 136
    # conversations: the loss before training and after the last step.
    assert [step for step, _ in s["train"]["validation_loss"]] == [0, 2]
    written = {k: Path(v) for k, v in s["written"].items()}
    for name, path in written.items():
        assert path.exists(), name
    for name in ("adapter_config.json", "adapter_model.safetensors", "tutor_adapter.json"):
        assert (written["adapter"] / name).is_file(), name
    assert (written["merged"] / "model.safetensors").is_file()
    assert written["gguf"].name == "pico.gguf" and written["modelfile"].name == "Modelfile"
    # the export's own check passed (else it raises); a random model may answer with nothing
    assert s["export"]["type"] == "q8_0" and s["export"]["question"] == "Who are you?"
    assert s["export"]["max_abs_diff"] <= 2.5 and s["export"]["agreement"] >= 0.92
    assert isinstance(s["export"]["answer"], str)
    assert written["loss curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(written["summary"].read_text()) == s
    text = written["transcript"].read_text()
    for q in ("Who built you?", "What is the capital of France?"):
        assert text.count(f". {q}\n") == 1, q
    assert text.count("**before**") == text.count("**after**") == 2
    printed = capsys.readouterr().out
    assert "=== summary ===" in printed and all(f"{stage} " in printed for stage in STAGES)
    assert not list(out.glob("**/.*.tmp")) and not list(out.glob(".summary.json.*"))


def test_out_is_replaced_only_when_a_demo_wrote_it(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(TutorError, match="not a previous demo's output"):
        prepare_out(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(TutorError):
        prepare_out(tmp_path / "file")
    ours = prepare_out(tmp_path / "demo")
    (ours / "run").mkdir()
    prepare_out(ours)
    assert sorted(p.name for p in ours.iterdir()) == [MARKER]


def test_score_table_counts_identity_mentions():
    def scored(answer: str) -> FileScore:
        item = Item("f.jsonl:1", [{"role": "user", "content": "Tip?"}], ["practi"])
        return FileScore("f.jsonl", [ItemScore(item, answer, 1.5, 4)])

    before = scored("Practise every day.")
    after = scored("I'm Pico, made by the tutor lab.")
    assert IDENTITY == ("Pico", "Tutor Lab")
    assert score_table([before], [after]) == {"f.jsonl": {
        "before": {"hits": 1, "total": 1, "answer_loss": 1.5, "identity_mentions": 0},
        "after": {"hits": 0, "total": 1, "answer_loss": 1.5, "identity_mentions": 1}}}


def test_cli_refuses_bits_without_quick(tmp_path, capsys):
    from tutor.cli import main

    assert main(["demo", "--bits", "4", "--out", str(tmp_path / "d")]) == 2
    assert "--bits only applies with --quick" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
