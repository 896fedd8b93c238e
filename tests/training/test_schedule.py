"""The learning-rate schedule (training/schedule.py) at the steps that define it."""

import math

import pytest

from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.schedule import lr_factor


def test_warmup_then_cosine_to_zero():
    factor = lr_factor(DamSettings(warmup_steps=4, schedule="cosine"), 14)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(14) == pytest.approx(0.0, abs=1e-12) and factor(20) == pytest.approx(0.0, abs=1e-12)


def test_linear_and_constant():
    linear, constant = lr_factor(DamSettings(schedule="linear"), 10), lr_factor(DamSettings(schedule="constant"), 10)
    assert [linear(step) for step in (0, 5, 10, 12)] == [1.0, 0.5, 0.0, 0.0]
    assert {constant(step) for step in range(12)} == {1.0}
