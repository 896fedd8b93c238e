"""Training checkpoints (training/checkpoint.py): what goes in comes back, for the same
training key only, and the validation selection's state travels with it."""

import torch

from mergekit_dam.training.checkpoint import Checkpoints, load_checkpoint, save_checkpoint
from mergekit_dam.training.selection import KeepBest


def _trained(steps: int = 3):
    raw = {"w": torch.nn.Parameter(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))}
    optimizer = torch.optim.AdamW(list(raw.values()), lr=0.1)
    for _ in range(steps):
        (raw["w"] * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return raw, optimizer


def test_a_checkpoint_restores_coefficients_and_adam_for_its_own_key_only(tmp_path):
    raw, optimizer = _trained()
    path = str(tmp_path / "c.ckpt")
    history = [{"step": 1, "loss": 1.0, "held_out_kl": {"a": 0.5}}]
    save_checkpoint(path, "key-1", 3, raw, optimizer, history)
    fresh = {"w": torch.nn.Parameter(torch.zeros(2, 2))}
    fresh_optimizer = torch.optim.AdamW(list(fresh.values()), lr=0.1)
    assert load_checkpoint(path, "key-2", fresh, fresh_optimizer) is None and torch.equal(fresh["w"], torch.zeros(2, 2))
    step, restored = load_checkpoint(path, "key-1", fresh, fresh_optimizer)
    assert (step, restored) == (3, history)
    assert torch.equal(fresh["w"], raw["w"])
    for slot in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(fresh_optimizer.state[fresh["w"]][slot], optimizer.state[raw["w"]][slot])
    assert float(fresh_optimizer.state[fresh["w"]]["step"]) == 3


def test_the_run_s_checkpoints_resume_its_selection_and_are_removed_at_the_end(tmp_path):
    raw, optimizer = _trained()
    select = KeepBest(raw, lambda: {"a": 1.0}, every=1, steps=10)
    select.measure(0)
    artifact = str(tmp_path / "c.safetensors")
    checkpoints = Checkpoints(artifact, "k", raw, True, 10, select)
    checkpoints.kl_start = {"a": 2.0}
    checkpoints.save(3, optimizer, [{"step": 3}])
    assert (tmp_path / "c.ckpt").exists()
    again = KeepBest(raw, lambda: {"a": 9.0}, every=1, steps=10)
    later = Checkpoints(artifact, "k", raw, True, 10, again)
    assert later.begin(torch.optim.AdamW(list(raw.values())), measure=lambda: {"a": 7.0})[0] == 3
    assert later.first_step == 3 and later.kl_start == {"a": 2.0} and again.curve == select.curve
    later.remove()
    assert not (tmp_path / "c.ckpt").exists()
