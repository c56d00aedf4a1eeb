"""The course's exercises for notebook 10: a DPO run at another β, a β sweep on a fixed batch.

Same rules as `tutor.course.exercises_basics`: the expected answer is computed from the package
(`tutor.preference.dpo_loss`) when the check runs. The batch of 10.2 and 10.3 is four pairs'
summed answer log-probs (policy and reference), written out so the exercise runs in
milliseconds; its numbers are inputs, not answers.

10.1 trains: its check reads the learner's cached run and the shipped one (measured and scored
files), as 06.3 does; it never trains itself.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tutor.course import pico, pico_dpo
from tutor.course.checks import Hint, Verdict, as_float, exercise, not_a_change, right, wrong

# Four pairs after some DPO steps: the policy raised three chosen answers and lowered three
# rejected ones relative to the reference; pair 3 went the wrong way.
BATCH = {"policy_chosen": [-12.0, -30.5, -8.25, -21.0],
         "policy_rejected": [-40.0, -55.0, -9.0, -60.0],
         "ref_chosen": [-14.0, -31.0, -8.0, -22.5],
         "ref_rejected": [-35.0, -50.0, -10.5, -52.0]}
BETAS = (0.01, 0.1, 0.5, 1.0)


def _dpo(batch: dict[str, list[float]], beta: float) -> dict[str, Any]:
    import torch

    from tutor.preference import dpo_loss

    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in batch.items()}
    return dpo_loss(t["policy_chosen"], t["policy_rejected"], t["ref_chosen"], t["ref_rejected"],
                    beta)


@exercise("10.1", "train at another β: what does it change on held-out pairs and the probe?")
def _beta_run(answer: Any) -> Verdict:
    if not (isinstance(answer, tuple) and len(answer) == 3):
        raise Hint("answer with (the list of overrides you trained with, your run's held-out "
                   "preference accuracy, your run's probe hits)")
    overrides, accuracy, hits = answer
    same = not_a_change(overrides, "preference.beta=0.1",
                        lambda o: pico_dpo.locate(overrides=o).root == pico_dpo.locate().root)
    if same:
        return same
    run, shipped = pico_dpo.locate(overrides=overrides), pico_dpo.locate()
    numbers = {}
    for who, r in (("your", run), ("the shipped recipe's", shipped)):
        files = pico_dpo.measured_file(r), r.root / "scores.json"
        if not all(f.is_file() for f in files):
            return wrong(f"{who} run is not measured yet: run pico_dpo.measured(run) and "
                         "pico.scored(run) for it first (training takes a minute or two)")
        probe = json.loads(files[1].read_text(encoding="utf-8"))["after"][pico.SCORED[1]]
        numbers[who] = (json.loads(files[0].read_text(encoding="utf-8"))["accuracy"],
                        probe["hits"], probe["total"])
    (acc, probe_hits, total), (acc0, hits0, _) = numbers.values()
    got = as_float(accuracy, "an accuracy")
    if not math.isclose(got, acc, abs_tol=1e-9):
        return wrong("that is the shipped run's accuracy: read pico_dpo.measured(run) of yours"
                     if math.isclose(got, acc0, abs_tol=1e-9) else
                     "read 'accuracy' from pico_dpo.measured(run) for your run")
    if hits != probe_hits:
        return wrong("the probe hits are pico.scored(run)['after'][pico.SCORED[1]]['hits'] "
                     "of your run")
    return right(f"held-out accuracy {acc:.2f} vs the recipe's {acc0:.2f}, probe "
                 f"{probe_hits}/{total} vs {hits0}/{total}: β scales every reward, so the loss "
                 "saturates once β·margin is a few units (a larger β stops the policy sooner) "
                 "while its gradient, β·σ(−β·margin), pushes harder at the start; which wins in "
                 "a 12-step run is what you measured")


@exercise("10.2", "the DPO loss of a fixed batch for β in (0.01, 0.1, 0.5, 1.0)", given=BATCH)
def _beta_sweep(answer: Any) -> Verdict:
    if not isinstance(answer, dict) or sorted(answer) != sorted(BETAS):
        raise Hint(f"the answer should be a dict {{beta: loss}} with the keys {BETAS}")
    got = {b: as_float(answer[b], f"the loss at beta={b}") for b in BETAS}
    expected = {b: float(_dpo(BATCH, b)["loss"]) for b in BETAS}
    if all(math.isclose(got[b], expected[b], rel_tol=1e-4) for b in BETAS):
        low = min(BETAS, key=expected.get)
        return right(f"lowest at β = {low} ({expected[low]:.3f}): a larger β sharpens every "
                     "margin, which helps the three right pairs until pair 3, the wrong way "
                     f"round, dominates ({expected[1.0]:.3f} at β = 1)")
    no_ref = {b: float(_dpo({**BATCH, "ref_chosen": [0.0] * 4, "ref_rejected": [0.0] * 4},
                            b)["loss"]) for b in BETAS}
    if all(math.isclose(got[b], no_ref[b], rel_tol=1e-4) for b in BETAS):
        return wrong("you left out the reference: each reward is β · (log π − log π_ref)")
    swapped = {b: float(_dpo({**BATCH, "policy_chosen": BATCH["policy_rejected"],
                              "policy_rejected": BATCH["policy_chosen"],
                              "ref_chosen": BATCH["ref_rejected"],
                              "ref_rejected": BATCH["ref_chosen"]}, b)["loss"]) for b in BETAS}
    if all(math.isclose(got[b], swapped[b], rel_tol=1e-4) for b in BETAS):
        return wrong("chosen and rejected are swapped: the margin is r_chosen − r_rejected")
    return wrong("loss = mean over pairs of −log σ(β·((πc − rc) − (πr − rr))); "
                 "compare one β with tutor.preference.dpo_loss")


@exercise("10.3", "the reward accuracy of the fixed batch at β = 0.01 and at β = 1", given=BATCH)
def _accuracy_vs_beta(answer: Any) -> Verdict:
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise Hint("the answer should be a pair (accuracy at β = 0.01, accuracy at β = 1)")
    small, large = (as_float(a, "an accuracy (fraction of pairs)") for a in answer)
    at = {b: float(_dpo(BATCH, b)["rewards/accuracies"].mean()) for b in (0.01, 1.0)}
    if math.isclose(small, at[0.01]) and math.isclose(large, at[1.0]):
        return right(f"{at[1.0]:.2f} at both: β > 0 scales both rewards, so it never changes "
                     "which one is larger — β sets how hard the loss pushes, not which pairs win")
    if small != large:
        return wrong("β > 0 multiplies both rewards of a pair: can it change which is larger?")
    return wrong("count the pairs whose reward margin β·((πc − rc) − (πr − rr)) is > 0, "
                 "divided by the number of pairs")
