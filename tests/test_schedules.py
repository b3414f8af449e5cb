"""The LR schedules match SPEC §2's formulas at chosen points."""
import math

import pytest

from trainer.config import LearningRateScheduler as S, config_from_dict
from trainer.optim.schedules import lr_curve, lr_multiplier, warmup_steps


def test_warmup_steps_and_fraction():
    assert warmup_steps(200, 1000) == 200
    assert warmup_steps(0.1, 1000) == 100
    assert warmup_steps(1, 50) == 50  # <= 1 is a fraction: 1 = all steps


def test_warmup_ramps_linearly():
    assert lr_multiplier(0, 100, S.CONSTANT, warmup=10) == 0
    assert lr_multiplier(5, 100, S.CONSTANT, warmup=10) == 0.5
    assert lr_multiplier(10, 100, S.CONSTANT, warmup=10) == 1


@pytest.mark.parametrize("scheduler, s, expected", [
    (S.LINEAR, 25, 0.75),
    (S.COSINE, 50, 0.5),
    (S.COSINE, 0, 1.0),
    (S.COSINE, 100, 0.0),
])
def test_simple_schedules(scheduler, s, expected):
    assert lr_multiplier(s, 100, scheduler) == pytest.approx(expected, abs=1e-12)


def test_min_factor_is_a_floor():
    m = 0.2
    assert lr_multiplier(100, 100, S.COSINE, min_factor=m) == pytest.approx(m)
    assert lr_multiplier(50, 100, S.LINEAR, min_factor=m) == pytest.approx(m + (1 - m) * 0.5)


def test_restarts_follow_formula():
    n, c = 100, 2
    for s in (0, 10, 25, 60, 99, 120):
        p = min(s, n - 1) / n
        soft = 0.5 * (1 + math.cos(2 * math.pi * c * p))
        hard = 0.5 * (1 + math.cos(math.pi * ((c * p) % 1)))
        assert lr_multiplier(s, n, S.COSINE_WITH_RESTARTS, cycles=c) == pytest.approx(soft)
        assert lr_multiplier(s, n, S.COSINE_WITH_HARD_RESTARTS, cycles=c) == pytest.approx(hard)
    # hard restarts jump back to 1 at the start of the second cycle
    assert lr_multiplier(50, n, S.COSINE_WITH_HARD_RESTARTS, cycles=2) == pytest.approx(1.0)


def test_rex_follows_formula_with_warmup_offset():
    warm, total = 10, 110
    for step in (10, 35, 60, 109):
        p = (step - warm) / (total - warm)
        expected = (1 - p) / (0.1 + 0.9 * (1 - p))
        assert lr_multiplier(step, total, S.REX, warmup=warm) == pytest.approx(expected)
    assert lr_multiplier(total, total, S.REX, warmup=warm) == 0


def test_curve_for_a_config():
    c = config_from_dict({"learning_rate": 1e-3, "learning_rate_scheduler": "COSINE",
                          "learning_rate_warmup_steps": 0})
    curve = lr_curve(c, 10)
    assert len(curve) == 10 and curve[0] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(curve, curve[1:]))
