"""Training on a GPU learns what it learns on the CPU (skipped without CUDA)."""

import json

import pytest
import torch
from conftest import artifact_merge, lab_config, merge, read_checkpoint, update_agreement
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.plugin.prepared import PREPARED


@pytest.fixture(scope="module")
def cpu_reference(lab, tmp_path_factory):
    """The float32 CPU run of FAST, online and top-K teachers: what a GPU run is held to."""
    folder = tmp_path_factory.mktemp("cpu_reference")
    tables = {}
    for teacher in ("online", "topk"):
        train_stage(lab_config(lab, folder / f"{teacher}.safetensors", train_device="cpu", train_dtype="float32", teacher=teacher, topk=32))
        tables[teacher] = load_file(str(folder / f"{teacher}.safetensors"))
    return tables


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, teacher, tolerance", [
    ("float32", "online", 1e-2),
    ("float32", "topk", 1e-2),
    # bf16 expert stacks change the models themselves; on CPU bf16 vs float32 gives 0.02
    ("bfloat16", "online", 0.1),
])
def test_gpu_training_learns_what_the_cpu_learns(lab, tmp_path, cpu_reference, dtype, teacher, tolerance, record_property):
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact, train_device="cuda", train_dtype=dtype, teacher=teacher, topk=32))
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == dtype
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    assert sum(final.values()) < sum(start.values())
    error, cosine = update_agreement(cpu_reference[teacher], load_file(str(artifact)))
    record_property("update_relative_error", error)
    record_property("update_cosine", cosine)
    assert error < tolerance, (error, cosine)


@pytest.mark.gpu
def test_gpu_default_training_in_bfloat16_then_a_cuda_merge(lab, tmp_path, monkeypatch, record_property):
    """train_device auto on a GPU machine: bf16 expert stacks, fp32 coefficients; the same
    config trains to the same coefficients twice; mergekit --cuda applies them exactly."""
    artifact = tmp_path / "c.safetensors"
    merge(lab_config(lab, artifact, steps=60), tmp_path / "out", cuda=True)
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    for expert in lab["experts"]:
        assert final[expert] < start[expert], (expert, start[expert], final[expert])
    record_property("held_out_kl", json.dumps({"start": start, "final": final}))
    record_property("peak_memory_bytes", report["peak_memory_bytes"])
    record_property("estimated_peak_bytes", report["estimate"]["peak_bytes"])
    coefficients = load_file(str(artifact))
    assert all(t.dtype == torch.float32 for t in coefficients.values())

    merged = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(artifact).items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(PREPARED, "trained", {})
    train_stage(lab_config(lab, tmp_path / "again.safetensors", steps=60))
    again = load_file(str(tmp_path / "again.safetensors"))
    record_property("rerun_max_abs_diff", max(float((again[n] - coefficients[n]).abs().max()) for n in coefficients))
    assert all(torch.equal(coefficients[n], again[n]) for n in coefficients)  # same config + seed, same device
