"""Sharded training (FSDP2) in two gloo processes on CPU, launched by torchrun exactly
as a user would, against the single-process run of the same config; the artifact it
writes is then applied by a stock `mergekit-yaml` merge."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    artifact_merge,
    lab_dam_config,
    mergekit_yaml,
    read_checkpoint,
    write_config,
)
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.core.errors import DamError
from mergekit_dam.training.modes import end_to_end

# checkpoints (gathered from the shards) and a non-identity f on the coefficients
SHARDED = {"steps": 6, "lr": 0.02, "max_length": 24, "batch_size": 2, "grad_accum": 2, "samples": 24, "train_device": "cpu",
           "checkpoint_every": 2, "nonlinearity": "sigmoid"}


def torchrun(config_path: str, *args: str, processes: int = 2, quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
         "-m", "mergekit_dam.cli", *(["-q"] if quiet else []), "train", config_path, *args],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def single_process(lab, tmp_path_factory):
    """The coefficients one process learns for SHARDED."""
    artifact = tmp_path_factory.mktemp("single") / "single.safetensors"
    train_stage(lab_dam_config(lab, artifact, **SHARDED))
    return load_file(str(artifact))


def test_two_processes_learn_what_one_process_learns(lab, tmp_path, single_process):
    sharded = tmp_path / "sharded.safetensors"
    config_path = write_config(tmp_path / "dam.yml", lab_dam_config(lab, sharded, **SHARDED))
    result = torchrun(config_path)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = single_process, load_file(str(sharded))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert any(not torch.allclose(t, torch.full_like(t, 0.25)) for t in two.values())  # it trained
    report = json.loads((tmp_path / "sharded.report.json").read_text())
    assert report["processes"] == 2 and len(report["loss_curve"]) == SHARDED["steps"]
    assert sorted(os.listdir(tmp_path)) == sorted(["dam.yml", "sharded.report.json", "sharded.safetensors", "sharded.validation.png"])

    # a stock merge applies the sharded run's artifact without training again
    merged = mergekit_yaml(config_path, str(tmp_path / "out"))
    assert "reusing coefficients" in merged.stderr + merged.stdout
    out = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(sharded).items():
        torch.testing.assert_close(out[name].double(), value, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_one_process_launch_takes_the_sharded_path(lab, tmp_path, device, single_process, record_property):
    """torchrun with one process runs FSDP on a world of one (NCCL on a GPU) and learns
    what the same config learns without a launch on that device."""
    parameters = {**SHARDED, "train_device": device, "train_dtype": "float32"}
    if device == "cpu":
        reference = single_process
    else:
        train_stage(lab_dam_config(lab, tmp_path / "plain.safetensors", **parameters))
        reference = load_file(str(tmp_path / "plain.safetensors"))
    config_path = write_config(tmp_path / "dam.yml", lab_dam_config(lab, tmp_path / "launched.safetensors", **parameters))
    result = torchrun(config_path, processes=1, quiet=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 1 processes (FSDP)" in result.stderr
    launched = load_file(str(tmp_path / "launched.safetensors"))
    assert launched.keys() == reference.keys()
    record_property("max_abs_diff", max(float((launched[n] - reference[n]).abs().max()) for n in reference))
    for name in reference:
        torch.testing.assert_close(launched[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)


def test_two_processes_resume_a_single_process_checkpoint(lab, tmp_path, monkeypatch, single_process):
    """Checkpoints hold whole tensors, so a run interrupted in one process can resume sharded."""
    parameters = SHARDED

    artifact = tmp_path / "resumed.safetensors"
    calls = {"count": 0}
    original = end_to_end.micro_batch_loss

    def interrupted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] > 4 * SHARDED["grad_accum"]:  # step 5 of 6: the step-4 checkpoint exists
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(end_to_end, "micro_batch_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_stage(lab_dam_config(lab, artifact, **parameters))
    assert os.path.exists(str(artifact.with_suffix(".ckpt"))) and not artifact.exists()

    config_path = write_config(tmp_path / "dam.yml", lab_dam_config(lab, artifact, **parameters))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mergekit_dam.cli", "train", config_path],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "at step 4 of 6" in result.stderr
    one, two = single_process, load_file(str(artifact))
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert not os.path.exists(str(artifact.with_suffix(".ckpt")))


def test_mergekit_yaml_launches_the_processes_itself(lab, tmp_path, single_process):
    artifact = tmp_path / "c.safetensors"
    config_path = write_config(tmp_path / "dam.yml", lab_dam_config(lab, artifact, **SHARDED, processes=2))
    result = mergekit_yaml(config_path, str(tmp_path / "out"))
    assert "training in 2 processes" in result.stderr
    two = load_file(str(artifact))
    for name in single_process:
        torch.testing.assert_close(two[name], single_process[name], atol=2e-5, rtol=1e-4, msg=name)
    assert json.loads((tmp_path / "c.report.json").read_text())["processes"] == 2
    out = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(artifact).items():
        torch.testing.assert_close(out[name].double(), value, atol=1e-5, rtol=1e-5)


def test_grad_accum_must_split_across_processes(lab, tmp_path, monkeypatch):
    # rank 0 of a 2-process launch: the check comes before the process group is joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DamError, match="set grad_accum to a multiple of 2"):
        train_stage(lab_dam_config(lab, tmp_path / "c.safetensors", **{**SHARDED, "grad_accum": 1}))
    assert not os.path.exists(tmp_path / "c.safetensors")


def test_layerwise_mode_refuses_a_launch(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DamError, match="mode: layerwise runs in one process"):
        train_stage(lab_dam_config(lab, tmp_path / "c.safetensors", mode="layerwise", max_length=24, samples=8))
