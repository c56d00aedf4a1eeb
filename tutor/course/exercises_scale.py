"""The course's exercises for notebook 09: ZeRO memory per GPU, and how many GPUs a stage needs.

Same rules as `tutor.course.exercises_basics`: the expected answer is computed from the package
(`tutor.course.zero`, `tutor.memory`) when the check runs.

Not handled: exercises on a live multi-GPU run (none can run where the course is tested).
"""

from __future__ import annotations

from typing import Any

from tutor.course.checks import (
    Hint,
    Verdict,
    as_float,
    as_int,
    exercise,
    judge,
    right,
    wrong,
)
from tutor.course.zero import Zero, estimate_zero
from tutor.memory import GIB, KNOWN, Setup

ARCH, GPUS = "internlm2-chat-7b", 16


@exercise("09.1", "GiB per GPU: InternLM2-7B full fine-tune, ZeRO-2 on 16 GPUs")
def _zero2_sixteen(answer: Any) -> Verdict:
    arch, full = KNOWN[ARCH], Setup(method="full", seq_len=2048, dtype="bfloat16")

    def gib(stage: int, gpus: int) -> float:
        return estimate_zero(arch, full, Zero(stage=stage, gpus=gpus)).total / GIB

    expected = gib(2, GPUS)
    return judge(as_float(answer, "GiB per GPU"), expected, rel=0.02,
                 why=f"{expected:.1f} GiB: the bf16 weights stay whole on every GPU, gradients "
                     f"and the fp32 master + Adam states are split 16 ways",
                 hint="estimate_zero(arch, full, Zero(stage=2, gpus=16)).total / GIB with the "
                      "notebook's `full` setup",
                 mistakes=[(gib(2, 8), "that is 8 GPUs; the question has 16"),
                           (gib(0, GPUS), "that is plain DDP (stage 0): nothing is split"),
                           (gib(1, GPUS), "that is ZeRO-1: ZeRO-2 splits the gradients too"),
                           (gib(3, GPUS), "that is ZeRO-3: ZeRO-2 keeps whole weights")])


BUDGET_GIB = 24  # one RTX 4090 / A10G-class card


@exercise("09.2", "the fewest 24 GiB GPUs on which ZeRO-3 fits the 7B full fine-tune")
def _fewest_gpus(answer: Any) -> Verdict:
    arch, full = KNOWN[ARCH], Setup(method="full", seq_len=2048, dtype="bfloat16")

    def gib(stage: int, gpus: int) -> float:
        return estimate_zero(arch, full, Zero(stage=stage, gpus=gpus)).total / GIB

    def fewest(stage: int) -> int:
        return next(n for n in range(1, 1025) if gib(stage, n) <= BUDGET_GIB)

    best, n = fewest(3), as_int(answer, "a number of GPUs")
    if n < 1:
        raise Hint("a number of GPUs, 1 or more")
    if n == best:
        odd = " (not a power of two: DeepSpeed does not mind)" if best & (best - 1) else ""
        return right(f"{best} GPUs{odd}: {gib(3, best):.1f} GiB each; on {best - 1} each "
                     f"would need {gib(3, best - 1):.1f} GiB")
    if n == fewest(2):
        return wrong(f"that is the answer for ZeRO-2 ({gib(2, n):.1f} GiB each); ZeRO-3 also "
                     "splits the weights")
    if gib(3, n) > BUDGET_GIB:
        return wrong(f"on {n} GPUs each needs {gib(3, n):.1f} GiB > {BUDGET_GIB}: loop over "
                     "gpus with estimate_zero(arch, full, Zero(stage=3, gpus=n)).total / GIB")
    return wrong(f"{n} GPUs fit ({gib(3, n):.1f} GiB each), but fewer do too: try every count "
                 "from 1 up, not only powers of two")
