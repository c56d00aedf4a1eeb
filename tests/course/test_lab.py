"""tutor.course.lab: every exercise accepts its right answer and meets a typical mistake with its
own hint; results reach TUTOR_LAB_REPORT; the notebooks end with the checks of their exercises;
`tutor lab check` runs a copy of a notebook and exits 0 (all right), 1 (not yet), 2 (raised).

Right answers here are literal numbers worked out by hand or measured once (the checks compute
theirs from the package), so a check that computes the wrong thing fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from tutor.cli import main
from tutor.course import lab
from tutor.course.checks import Hint, choice
from tutor.errors import TutorError

NBS = Path(__file__).resolve().parents[2] / "nbs"
LLAMA2 = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"

# The pack of 2, 4 and 3 tokens of 05.3, written out: a causal triangle per sample
MASK_2_4_3 = [[1, 0, 0, 0, 0, 0, 0, 0, 0],
              [1, 1, 0, 0, 0, 0, 0, 0, 0],
              [0, 0, 1, 0, 0, 0, 0, 0, 0],
              [0, 0, 1, 1, 0, 0, 0, 0, 0],
              [0, 0, 1, 1, 1, 0, 0, 0, 0],
              [0, 0, 1, 1, 1, 1, 0, 0, 0],
              [0, 0, 0, 0, 0, 0, 1, 0, 0],
              [0, 0, 0, 0, 0, 0, 1, 1, 0],
              [0, 0, 0, 0, 0, 0, 1, 1, 1]]

# id, a right answer, a typical wrong answer, words its hint must contain
CASES = [
    ("01.1", LLAMA2, LLAMA2.replace("\n\nHi!", "\nHi!"), "character 37"),
    ("01.2", {"qwen_chat": 23, "vicuna": 29}, {"qwen_chat": 98, "vicuna": 155},
     "those are characters"),  # tokens of the two default system turns, counted once
    ("02.1", 12, 56, "only labels != -100 are trained"),
    ("02.2", 13, 12, "EOS"),
    ("03.1", [41, 42], [40, 41], "count from 1"),  # everyday_qa.jsonl: its two Chinese requests
    ("03.2", 4, 2, "only a warning"),
    ("04.1", 39_976_960, 39_976_960 // 32, "one block"),
    ("04.2", 10, 12, "absmax"),
    ("04.3", 1536, 2048, "8.28 GiB > 8"),
    ("05.1", 1010 / 1024, 1010 / 1536, "greedy"),
    ("05.2", 5 * 6 // 2 + 1 + 3 * 4 // 2, 45, "plain causal mask"),
    ("05.3", MASK_2_4_3, [[int(j <= i) for j in range(9)] for i in range(9)],
     "samples may not see each other"),  # bool or 0/1, (L, L) or (1, 1, L, L)
    ("05.3", [[MASK_2_4_3]], [row[:8] for row in MASK_2_4_3[:8]], "(9, 9)"),
    # |ΔW x| / |W x| at (r=4, α=32), (r=64, α=16), rsLoRA (r=64, α=16), computed once
    ("06.1", [0.1034276, 0.0109349, 0.0874792], [0.1034276, 0.0109349, 0.0109349], "√r"),
    ("06.2", 47 * 2, 47, "one epoch"),  # 256-token packs of the recipe's 90 %, shared prefix
    ("06.2", 47 * 2, 23 * 2, "512 tokens"),
    ("07.1", [[3, 4, 0], [0, 1, 0]], [[1.5, 1, 0], [0, 1, 0]], "alpha / r = 4"),
    # slope of NF4(W+Δ) − NF4(W) along Δ, measured once; 9.19 = the error against exact W+Δ
    ("07.3", 1.023945, 9.18563, "mixes in NF4's rounding of W"),
    ("09.1", 23.5, 31.6, "that is 8 GPUs"),
    ("09.2", 7, 8, "fewer do too"),  # ZeRO-3 on 24 GiB cards
    ("09.2", 7.0, 16, "that is the answer for ZeRO-2"),
    # mean of −log σ(β·margin), margins (7, 5.5, −1.75, 9.5); without the reference (28, 24.5,
    # 0.75, 39)
    ("10.2", {0.01: 0.668374, 0.1: 0.492526, 0.5: 0.330944, 1.0: 0.478822},
     {0.01: 0.586873, 0.1: 0.204549, 0.5: 0.130782, 1.0: 0.096718}, "left out the reference"),
    ("10.3", (0.75, 0.75), (0.75, 1.0), "multiplies both rewards"),
]
# These load the bundled model (bf16, or fp32 for four forward passes).
SLOW_CASES = [
    ("00.1", 45.0, 135.0, "num_key_value_heads"),  # 2 x 30 x 3 x 64 x 2 B x 2048 tokens
    ("00.2", 108.13 / 158.76, 0.2103, "share of numbers"),  # MiB measured once; numbers 21 %
    ("02.3", (6.846, 3.781), (3.781, 6.846), "swapped"),  # fp32 losses, measured once
    ("08.1", 9.8, 1 / 9.8, "other way round"),
]


def _check(capsys, exercise_id, answer) -> tuple[bool, str]:
    ok = lab.check(exercise_id, answer)
    return ok, capsys.readouterr().out.strip()


def _assert_case(capsys, exercise_id, good, bad, hint) -> None:
    ok, line = _check(capsys, exercise_id, good)
    assert ok and line.startswith(f"✓ {exercise_id} right — "), line
    ok, line = _check(capsys, exercise_id, bad)
    assert not ok and line.startswith(f"✗ {exercise_id} not yet — hint: "), line
    assert hint in line, line


@pytest.mark.parametrize("exercise_id, good, bad, hint", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_right_and_wrong(capsys, exercise_id, good, bad, hint):
    _assert_case(capsys, exercise_id, good, bad, hint)


@pytest.mark.slow
@pytest.mark.parametrize("exercise_id, good, bad, hint", SLOW_CASES,
                         ids=[c[0] for c in SLOW_CASES])
def test_right_and_wrong_with_the_model(capsys, exercise_id, good, bad, hint):
    _assert_case(capsys, exercise_id, good, bad, hint)


def test_own_csv(capsys, tmp_path):
    csv_file, jsonl = tmp_path / "mine.csv", tmp_path / "mine.jsonl"
    csv_file.write_text('question,answer\nA?,"yes, a"\nB?,b\nC?,c\n', encoding="utf-8")
    assert main(["data", "convert", str(csv_file), str(jsonl)]) == 0
    capsys.readouterr()
    _assert_case(capsys, "03.3", jsonl, csv_file, "not the CSV")
    csv_file.write_text("question,answer\nA?,a\nB?,b\nC?,c\n", encoding="utf-8")
    assert main(["data", "convert", str(csv_file), str(jsonl)]) == 0
    capsys.readouterr()
    assert _check(capsys, "03.3", jsonl)[1].endswith("see a quoted CSV field survive")


def test_probe_experiment_compares_with_the_shipped_run(capsys, tmp_path, monkeypatch):
    """06.3 reads both scored runs (the learner's and the shipped recipe's) and checks the
    difference of their probe answer losses."""
    import json

    import tutor.course.pico as pico

    monkeypatch.setenv("TUTOR_HOME", str(tmp_path))
    overrides = ["train.epochs=1"]
    ok, line = _check(capsys, "06.3", (overrides, 0.1))
    assert not ok and "yours run is not scored yet" in line  # not trained yet
    for runs, loss in ((overrides, 2.1), ((), 1.5)):
        root = pico.locate(overrides=runs).root
        root.mkdir(parents=True)
        probe = {"hits": 9, "total": 16, "answer_loss": loss, "identity_mentions": 2}
        (root / "scores.json").write_text(json.dumps({"after": {pico.SCORED[1]: probe}}))
    _assert_case(capsys, "06.3", (overrides, 2.1 - 1.5), (overrides, 1.5 - 2.1), "other way")
    assert "your loss alone" in _check(capsys, "06.3", (overrides, 2.1))[1]
    assert "one change at least" in _check(capsys, "06.3", ([], 0.6))[1]
    assert "same cache key" in _check(capsys, "06.3", (["train.epochs=2"], 0.0))[1]


def test_beta_run_reads_the_learners_dpo_run_and_the_shipped_one(capsys, tmp_path,
                                                                 monkeypatch):
    """10.1 reads both DPO runs' cached numbers (held-out accuracy, probe hits) and accepts
    only the learner's own."""
    import json

    from tutor.course import pico, pico_dpo

    monkeypatch.setenv("TUTOR_HOME", str(tmp_path))
    overrides = ["preference.beta=0.1"]  # the recipe's β is 0.5
    ok, line = _check(capsys, "10.1", (overrides, 0.5, 9))
    assert not ok and "your run is not measured yet" in line  # not trained yet
    for runs, accuracy, hits in ((overrides, 0.85, 9), ((), 0.6, 11)):
        run = pico_dpo.locate(overrides=runs)
        run.root.mkdir(parents=True)
        pico_dpo.measured_file(run).write_text(json.dumps({"accuracy": accuracy}))
        probe = {"hits": hits, "total": 16, "answer_loss": 1.7, "identity_mentions": 0}
        (run.root / "scores.json").write_text(json.dumps({"after": {pico.SCORED[1]: probe}}))
    _assert_case(capsys, "10.1", (overrides, 0.85, 9), (overrides, 0.6, 9), "shipped run's")
    assert "probe hits" in _check(capsys, "10.1", (overrides, 0.85, 11))[1]
    assert "same cache key" in _check(capsys, "10.1", (["preference.beta=0.5"], 0.6, 11))[1]
    assert "list of overrides" in _check(capsys, "10.1", ([], 0.85, 9))[1]


@pytest.mark.slow
def test_pico_experiments_07_2_and_08_2(capsys):
    """07.2 and 08.2 measure the cached Pico (trained now if missing: minutes). Their right
    answers come from the run, so the case checks that the measured value is accepted and
    that the typical mistake gets its hint."""
    from tutor.course import exercises_models as ex

    flips, positions = ex._next_token_flips(ex.FLIP_PROMPTS)
    share = flips / positions
    assert 0 <= share < 0.5  # the two models mostly agree: the gap is a few positions
    _assert_case(capsys, "07.2", share, 1 - share, "share that agrees")
    _assert_case(capsys, "08.2", _distinct_sampled(), len(ex.SAMPLING["seeds"]) + 5,
                 "len(set(answers))")


def _distinct_sampled() -> int:
    """08.2 worked as the solution notebook does."""
    from tutor.chat import GenerationSettings, pick_system
    from tutor.course import exercises_models as ex
    from tutor.course.pico import merged
    from tutor.course.sampling import sample_answers
    from tutor.models import load

    g, pico = ex.SAMPLING, merged(echo=lambda _: None)
    model, tok = load(pico.merged)
    answers = sample_answers(model, tok, g["question"], GenerationSettings(
        max_new_tokens=g["max_new_tokens"], temperature=g["temperature"], top_p=g["top_p"]),
        g["seeds"], system=pick_system(str(pico.merged), None, None))
    return len(set(answers))


def test_every_exercise_has_a_case():
    tested = {c[0] for c in CASES + SLOW_CASES} | {"03.3", "06.3", "07.2", "08.2", "10.1"}
    assert tested == set(lab.exercises())


def test_lora_count_matches_peft_on_the_llama2_layout():
    """04.1 counts LoRA on KNOWN['llama-2-7b']'s layout: peft on the real Llama class with
    that config (2 blocks, on the meta device: no memory) must train the same numbers."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tutor.lora import lora_param_count, peft_config
    from tutor.memory import KNOWN

    a = KNOWN["llama-2-7b"]
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                         intermediate_size=a.intermediate_size, num_hidden_layers=2,
                         num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               peft_config(r=16, alpha=32, dropout=0.0))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == lora_param_count([(i, o) for i, o, _ in a.block_linears()] * 2, 16)
    assert trained * a.num_layers // 2 == 39_976_960


def test_not_answered_wrong_type_and_unknown_id(capsys):
    ok, line = _check(capsys, "05.3", ...)
    assert not ok and line == "… 05.3 not answered yet — replace the `...`"
    ok, line = _check(capsys, "04.2", "ten")
    assert not ok and "should be a code from 0 to 15 (an int), not str" in line
    with pytest.raises(Hint, match="one of the letters a, b, c"):
        choice("d", "b", why="", hints={"a": "", "c": ""})
    ok, line = _check(capsys, "05.3", "a mask")
    assert not ok and "a 9 × 9 tensor (or nested list)" in line
    with pytest.raises(TutorError, match="unknown exercise '05.9'; known: 05.1, 05.2, 05.3"):
        lab.check("05.9", 1)


def test_given_is_a_fresh_copy(capsys):
    block = lab.given("04.2")
    block[5] = 0.0  # a student's edit must not change what is checked
    assert lab.given("04.2")[5] == 0.5 and _check(capsys, "04.2", 10)[0]


def test_report_lines(capsys, tmp_path, monkeypatch):
    report = tmp_path / "report.jsonl"
    monkeypatch.setenv(lab.REPORT_ENV, str(report))
    lab.check("05.2", 22)
    lab.check("05.2", 45)
    lab.check("05.3", ...)
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["status"]) for r in rows] == [
        ("05.2", "right"), ("05.2", "wrong"), ("05.3", "unanswered")]
    assert "plain causal mask" in rows[1]["message"]


def _last_code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"][-1].source


def test_notebooks_and_solutions_check_every_exercise():
    """Each notebook's last cell checks exactly its exercises; its solution asserts them."""
    by_notebook: dict[str, set[str]] = {}
    for exercise_id in lab.exercises():
        by_notebook.setdefault(exercise_id.split(".")[0], set()).add(exercise_id)
    for number, ids in by_notebook.items():
        [notebook] = NBS.glob(f"{number}_*.ipynb")
        assert 1 <= len(ids) <= 3, notebook.name
        checked = set(re.findall(r'"(\d\d\.\d+)"', _last_code(notebook)))
        assert checked == ids and "lab.check(" in _last_code(notebook), notebook.name
        solution = NBS / "solutions" / notebook.name
        asserted = set(re.findall(r'assert lab\.check\("(\d\d\.\d+)"', _last_code(solution)))
        assert asserted == ids, solution.name


def _unsolved_copy(solution: Path, dest: Path) -> Path:
    """The solution notebook as a student starts it: solved cells keep their imports and
    `answer_k = ...`, and the last cell checks without asserting."""
    nb = nbformat.read(solution, as_version=4)
    for cell in nb.cells:
        names = re.findall(r"(?m)^(answer_\d+) = ", cell.source) if cell.cell_type == "code" else []
        if names:
            imports = [ln for ln in cell.source.splitlines() if ln.startswith(("from ", "import "))]
            cell.source = "\n".join(imports + [f"{name} = ..." for name in names])
        cell.source = cell.source.replace("assert lab.check", "lab.check")
    path = dest / solution.name
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_lab_check_command(tmp_path, capsys):
    """Solved → exit 0; unsolved → exit 1 and 'not answered'; a raising cell → exit 2."""
    solution = NBS / "solutions" / "01_chat_templates.ipynb"  # no model: the fastest
    before = solution.read_bytes()
    assert main(["lab", "check", str(solution), "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "01.1      right" in out and out.rstrip().endswith("2 of 2 right")
    assert solution.read_bytes() == before  # a copy ran, the file is untouched

    assert main(["lab", "check", str(_unsolved_copy(solution, tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "01.2      not answered  replace the `...`" in out and "0 of 2 right" in out

    broken = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                             nbformat.v4.new_code_cell("y = x / 0")])
    nbformat.write(broken, tmp_path / "broken.ipynb")
    assert main(["lab", "check", str(tmp_path / "broken.ipynb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("cell 2 (`y = x / 0`) raised ZeroDivisionError: division by zero"), err


def test_missing_checks_are_reported(tmp_path):
    results = lab._results([{"id": "05.1", "status": "right", "message": "ok"}], "x.ipynb")
    assert [(r.id, r.status) for r in results] == [
        ("05.1", lab.RIGHT), ("05.2", lab.UNCHECKED), ("05.3", lab.UNCHECKED)]
    assert not lab.all_right(results) and not lab.all_right([])
    table = lab.format_results(results)
    assert "05.2      not checked   the notebook never called lab.check" in table
