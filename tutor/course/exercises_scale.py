"""The course's exercises for notebook 09: ZeRO memory per GPU and what each stage splits.

Same rules as `tutor.course.exercises_basics`: the expected answer is computed from the package
(`tutor.course.zero`, `tutor.memory`) when the check runs.

Not handled: exercises on a live multi-GPU run (none can run where the course is tested).
"""

from __future__ import annotations

from typing import Any

from tutor.course.checks import Verdict, as_float, choice, exercise, judge

ARCH, GPUS = "internlm2-chat-7b", 16


@exercise("09.1", "GiB per GPU: InternLM2-7B full fine-tune, ZeRO-2 on 16 GPUs")
def _zero2_sixteen(answer: Any) -> Verdict:
    from tutor.course.zero import Zero, estimate_zero
    from tutor.memory import GIB, KNOWN, Setup

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


@exercise("09.2", "which stage also splits the weights themselves (a/b/c)")
def _which_stage(answer: Any) -> Verdict:
    return choice(answer, "c",
                  why="ZeRO-3 partitions the parameters and gathers each layer just before "
                      "it runs; ZeRO-1 splits optimizer states, ZeRO-2 adds the gradients",
                  hints={"a": "ZeRO-1 splits only the optimizer states (Adam moments, fp32 "
                              "master); every GPU still holds all weights",
                         "b": "ZeRO-2 adds the gradients to what ZeRO-1 splits, but the "
                              "weights stay whole on each GPU"})
