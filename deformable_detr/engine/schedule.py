"""The learning-rate schedule: a factor of each parameter group's lr per optimiser step, for LambdaLR."""

import math
from collections.abc import Callable

SCHEDULES = ("step", "cosine")


def lr_factor(schedule: str, max_steps: int, warmup_steps: int = 0, lr_drop: float = 0.8) -> Callable[[int], float]:
    """step -> factor. The first `warmup_steps` rise linearly to 1 ((step + 1) / warmup_steps: no step at lr 0);
    then "step" (the paper's) stays at 1 until `lr_drop` of max_steps and is 0.1 after, and "cosine" falls from 1
    to 0 at max_steps along half a cosine. (TrainingOptions checks that `schedule` is one of SCHEDULES.)"""
    drop_step = int(lr_drop * max_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "step":
            return 0.1 if step >= drop_step else 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
