"""Training runs once per artifact: reused under the same training key, retrained when it
changes, deterministic, and resumed after an interruption to the coefficients an
uninterrupted run learns."""

import json
import logging
import os

import pytest
import torch
from conftest import lab_config, merge, write_config
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.cli import main as cli
from mergekit_dam.core.errors import DamError
from mergekit_dam.plugin.prepared import PREPARED
from mergekit_dam.training import checkpoint


def test_reuse_retrain_and_determinism(lab, tmp_path, caplog, monkeypatch):
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact))
    first = load_file(str(artifact))
    stamp = os.stat(artifact).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        train_stage(lab_config(lab, artifact))
    assert "(no training)" in caplog.text and os.stat(artifact).st_mtime_ns == stamp
    monkeypatch.setattr(PREPARED, "trained", {})  # as in a new process: retrain really retrains
    train_stage(lab_config(lab, artifact, retrain=True))
    assert os.stat(artifact).st_mtime_ns != stamp
    again = load_file(str(artifact))
    assert all(torch.equal(first[name], again[name]) for name in first)  # same config + seed


def test_changed_hyperparameter_retrains(lab, tmp_path, caplog):
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact))
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        train_stage(lab_config(lab, artifact, temperature=1.0))
    assert "trained for other models, data or hyperparameters: retraining" in caplog.text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_after_interrupt_equals_uninterrupted(lab, tmp_path, monkeypatch, device):
    reference = tmp_path / "reference.safetensors"
    train_stage(lab_config(lab, reference, train_device=device))
    resumed = tmp_path / "resumed.safetensors"
    save = checkpoint.save_checkpoint

    def save_then_die(path, key, step, *args):
        save(path, key, step, *args)
        if step == 8:
            raise KeyboardInterrupt("simulated kill after the step-8 checkpoint")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_stage(lab_config(lab, resumed, checkpoint_every=4, train_device=device))
    assert not resumed.exists() and os.path.exists(str(resumed.with_suffix(".ckpt")))
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    train_stage(lab_config(lab, resumed, checkpoint_every=4, train_device=device))
    a, b = load_file(str(reference)), load_file(str(resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not os.path.exists(str(resumed.with_suffix(".ckpt")))
    curve = json.loads((tmp_path / "resumed.report.json").read_text())["loss_curve"]
    assert [point["step"] for point in curve] == list(range(1, 13))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_out_of_memory_mid_run_is_one_line_and_the_run_resumes(lab, tmp_path, monkeypatch, device):
    """On a GPU the allocator itself fails (a 16 TiB request at step 5); on CPU the error is raised."""
    from mergekit_dam.training.modes import end_to_end

    reference = tmp_path / "reference.safetensors"
    train_stage(lab_config(lab, reference, train_device=device))
    real, calls = end_to_end.micro_batch_loss, []

    def run_out_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            if device == "cuda":
                torch.empty(2**44, dtype=torch.uint8, device=device)
            raise torch.OutOfMemoryError("out of memory")
        return real(*args, **kwargs)

    artifact = tmp_path / "c.safetensors"
    monkeypatch.setattr(end_to_end, "micro_batch_loss", run_out_at_step_5)
    with pytest.raises(DamError, match=r"ran out of memory at step 5 \(peak .* GiB.*\); lower max_length .* the same command resumes"):
        train_stage(lab_config(lab, artifact, train_device=device))
    assert not artifact.exists() and os.path.exists(str(artifact.with_suffix(".ckpt")))
    monkeypatch.setattr(end_to_end, "micro_batch_loss", real)
    train_stage(lab_config(lab, artifact, train_device=device))
    a, b = load_file(str(reference)), load_file(str(artifact))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_cli_train_then_apply_only(lab, tmp_path):
    config = write_config(tmp_path / "dam.yml", lab_config(lab, tmp_path / "unused.safetensors"))
    assert cli(["-q", "train", config, "--out", str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").exists() and not (tmp_path / "unused.safetensors").exists()
    apply_only = lab_config(lab, tmp_path / "c.safetensors", data=False)
    merge(apply_only, tmp_path / "out")  # no datasets: the artifact is applied, nothing trains
    assert (tmp_path / "out" / "model.safetensors").exists()
