"""The one training loop, on a toy problem whose answer is known in closed form."""

import pytest
import torch

from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings
from mergekit_dam.training.loop import Problem, fit
from mergekit_dam.training.schedule import lr_factor


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n

    def set_postfix(self, **_):
        pass


def quadratic(param, targets):
    """Micro-batch m of any step: (p - targets[m])^2, one 'token', KL = the loss."""
    def micro_batch(step, micro):
        loss = (param - targets[micro]).pow(2).sum()
        return loss, 1, {"x": loss}
    return micro_batch


def test_accumulation_averages_the_micro_batches():
    settings = DamSettings(lr=0.1, grad_accum=2, grad_clip=0)
    param = torch.nn.Parameter(torch.zeros(1))
    history = fit(Problem([param], 1, quadratic(param, [1.0, 3.0])), settings, Bar())
    # one AdamW step moves p by lr along -sign(mean gradient) (= -sign(-4) here): 0 -> 0.1
    torch.testing.assert_close(param.detach(), torch.tensor([0.1]))
    assert history == [{"step": 1, "loss": 5.0, "kl": {"x": 5.0}, "tokens": 2}]


def test_non_finite_loss_names_the_step_the_stage_and_the_fix():
    settings = DamSettings(lr=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    stage = Problem([param], 3, lambda step, micro: (param.sum() * float("nan"), 1, {}), name="layer0")
    with pytest.raises(DamError, match=r"loss became nan at step 1 of stage layer0; lower `lr` \(now 0.1\) or `temperature`"):
        fit(stage, settings, Bar())


def test_resume_and_checkpoint_hooks():
    settings = DamSettings(lr=0.1, checkpoint_every=2)
    param = torch.nn.Parameter(torch.zeros(1))
    saved, bar = [], Bar()
    history = fit(Problem([param], 7, quadratic(param, [1.0]), name="s"), settings, bar,
                  begin=lambda optimizer: (3, [{"step": s} for s in (1, 2, 3)]),
                  save=lambda step, optimizer, history: saved.append((step, len(history))))
    assert [entry["step"] for entry in history] == list(range(1, 8)) and history[-1]["stage"] == "s"
    assert saved == [(4, 4), (6, 6)]  # every 2 steps, never after the last
    assert bar.n == 7


def test_schedules():
    cosine = lr_factor(DamSettings(schedule="cosine", warmup_steps=2), 10)
    assert [cosine(0), cosine(1), cosine(2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    linear = lr_factor(DamSettings(schedule="linear"), 4)
    assert [linear(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_time_based_checkpoints():
    param = torch.nn.Parameter(torch.zeros(1))
    saved = []
    fit(Problem([param], 4, quadratic(param, [1.0])), DamSettings(lr=0.1, checkpoint_minutes=1e-9), Bar(),
        save=lambda step, optimizer, history: saved.append(step))
    assert saved == [1, 2, 3]  # due after every step here; never after the last
    saved.clear()
    fit(Problem([param], 4, quadratic(param, [1.0])), DamSettings(lr=0.1, checkpoint_minutes=0), Bar(),
        save=lambda step, optimizer, history: saved.append(step))
    assert saved == []


def test_out_of_memory_in_a_step_is_one_line_after_a_checkpoint():
    settings = DamSettings(lr=0.1, max_length=512, batch_size=4)
    param = torch.nn.Parameter(torch.zeros(1))
    saved = []

    def micro_batch(step, micro):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return quadratic(param, [1.0])(step, micro)

    with pytest.raises(DamError) as error:
        fit(Problem([param], 5, micro_batch), settings, Bar(), save=lambda step, optimizer, history: saved.append((step, len(history))))
    message = str(error.value)
    assert message.startswith("dam: cpu ran out of memory at step 3 (peak ") and "\n" not in message
    assert "lower max_length (now 512) or batch_size (now 4), use recompute: layer or mode: layerwise" in message
    assert message.endswith("a checkpoint was written, so the same command resumes from it")
    assert saved == [(2, 2)]  # the two finished steps, not the failed one
    assert param.grad is None


def test_log_lines_print_above_the_progress_bar_not_into_it(capsys):
    import logging
    import sys

    from tqdm.auto import tqdm

    handler = logging.StreamHandler(sys.stderr)  # as mergekit-yaml's root handler does
    root, dam = logging.getLogger(), logging.getLogger("mergekit_dam")
    root.addHandler(handler)
    level = dam.level
    dam.setLevel(logging.INFO)
    try:
        param = torch.nn.Parameter(torch.zeros(1))
        progress = tqdm(total=3, file=sys.stderr, ascii=True)
        fit(Problem([param], 3, quadratic(param, [1.0])), DamSettings(lr=0.1), progress, log_eta=True)
        progress.close()
    finally:
        root.removeHandler(handler)
        dam.setLevel(level)
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    (line,) = [line for line in lines if "first step took" in line]
    assert line.startswith("dam: first step took"), line
