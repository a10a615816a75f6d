"""The lr schedules (engine/schedule.py) at given steps."""

import math

import pytest

from deformable_detr.engine import TrainingOptions
from deformable_detr.engine.schedule import lr_factor


def test_step_schedule_is_the_papers_with_an_optional_warmup():
    plain = lr_factor("step", max_steps=100)
    assert [plain(s) for s in (0, 79, 80, 99)] == [1.0, 1.0, 0.1, 0.1]
    warm = lr_factor("step", max_steps=100, warmup_steps=4)
    assert [warm(s) for s in (0, 1, 3, 4, 79, 80)] == [0.25, 0.5, 1.0, 1.0, 1.0, 0.1]


def test_cosine_schedule_falls_to_zero_after_its_warmup():
    cosine = lr_factor("cosine", max_steps=110, warmup_steps=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5)
    assert cosine(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(110) == pytest.approx(0.0) and cosine(500) == pytest.approx(0.0)


def test_bad_schedule_options_are_named():
    with pytest.raises(ValueError, match="lr_scheduler must be one of \\('step', 'cosine'\\), got 'linear'"):
        TrainingOptions(dataset="x", config_name="tiny", lr_scheduler="linear")
    with pytest.raises(ValueError, match="warmup_steps must be at least 0"):
        TrainingOptions(dataset="x", config_name="tiny", warmup_steps=-1)
