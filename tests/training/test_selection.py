"""Validation-driven training (selection.KeepBest): the kept step, early stops, and the
guarantee that the written coefficients are no worse than the linear start on validation."""

import json
import logging

import pytest
import torch
from conftest import lab_dam_config, linear_start
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.training.selection import KeepBest, evaluation_interval


def scripted(param, scores):
    """validate() returns the next scripted score; the parameter records the step."""
    calls = iter(scores)
    return lambda: {"a": next(calls)}


def run(select, param, steps):
    select.measure(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            param.fill_(step)  # "training" moves the parameter to the step number
        if select.after_step(step):
            break
    select.finish()


def test_the_best_step_is_kept_and_put_back():
    param = torch.nn.Parameter(torch.zeros(2))
    select = KeepBest({"p": param}, scripted(param, [1.0, 0.9, 0.5, 0.7, 0.6]), every=1, steps=4)
    run(select, param, 4)
    assert select.best_step == 2 and torch.equal(param.detach(), torch.full((2,), 2.0))
    report = select.report()
    assert [point["step"] for point in report["curve"]] == [0, 1, 2, 3, 4]
    assert report["start_mean"] == 1.0 and report["best_mean"] == 0.5 and report["improved_on_start"]


def test_patience_stops_and_the_start_is_kept_when_nothing_beats_it(caplog):
    param = torch.nn.Parameter(torch.zeros(1))
    select = KeepBest({"p": param}, scripted(param, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]), every=1, steps=10, patience=3)
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        run(select, param, 10)
    assert select.stopped_at == 3 and select.best_step == 0 and float(param.detach()) == 0.0
    assert "stopped after step 3 of 10: no improvement in 3 evaluations" in caplog.text
    assert "training never improved on the starting coefficients' validation KL (1.0000); writing the start" in caplog.text
    assert not select.report()["improved_on_start"]


def test_keep_best_off_keeps_the_last_and_a_spent_budget_stops():
    param = torch.nn.Parameter(torch.zeros(1))
    select = KeepBest({"p": param}, scripted(param, [1.0, 0.5, 0.7, 0.8]), every=2, steps=10, keep_best=False, max_minutes=0.5)
    select.measure(0)
    assert not select.after_step(1)  # not due: no evaluation
    assert not select.after_step(2)
    assert select.after_step(3, spent=True)  # the budget: one last evaluation, then stop
    with torch.no_grad():
        param.fill_(3)
    select.finish()
    assert select.stopped_at == 3 and select.why == "the 0.5-minute budget is spent"
    assert [point["step"] for point in select.curve] == [0, 2, 3]
    assert float(param.detach()) == 3.0  # keep_best off: the last coefficients, not step 2's


def test_state_round_trips_for_checkpoints():
    param = torch.nn.Parameter(torch.zeros(3))
    select = KeepBest({"p": param}, scripted(param, [1.0, 0.4]), every=1, steps=5)
    select.measure(0)
    with torch.no_grad():
        param.fill_(7)
    select.after_step(1)
    tensors, metadata = select.state()
    again = KeepBest({"p": param}, scripted(param, []), every=1, steps=5)
    again.restore_state(tensors, metadata)
    assert again.best_step == 1 and again.curve == select.curve and torch.equal(again.best["p"], torch.full((3,), 7.0))


@pytest.mark.parametrize("steps, eval_every, expected", [(100, 0, 5), (7, 0, 1), (100, 3, 3)])
def test_evaluation_interval(steps, eval_every, expected):
    assert evaluation_interval(eval_every, steps) == expected


def test_a_run_that_only_gets_worse_writes_the_linear_start_and_says_so(lab, tmp_path, caplog):
    """The real stage with a learning rate far too high: keep-best writes the start (the
    linear average of the experts) exactly."""
    artifact = tmp_path / "c.safetensors"
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        train_stage(lab_dam_config(lab, artifact, steps=6, lr=3.0, grad_clip=0, max_length=24, batch_size=4, samples=40))
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert not report["validation"]["improved_on_start"], report["validation"]
    assert "training never improved on the starting coefficients' validation KL" in caplog.text
    start = linear_start(artifact, lab["base"])
    for table in load_file(str(artifact)).values():
        torch.testing.assert_close(table, start.expand_as(table))
    assert (tmp_path / "c.validation.png").stat().st_size > 1000
