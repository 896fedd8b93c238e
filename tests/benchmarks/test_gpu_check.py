"""The GPU check's benchmark scripts (benchmarks/gpu_check.py --smoke: tiny geometry on CPU).
They reach into the training engine's internals, so an engine change that breaks them must fail
here, on CPU, and not first on a lent GPU (where `make_teacher`'s new return value once cost four
of the check's nine steps)."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "gpu_check.py")
# the steps that use the engine's internals; the others go through the public API (the training
# stage, apply) or are the GPU tests themselves
STEPS = ["merge_kernels", "train_step_1b_online", "train_step_7b_topk"]


def test_smoke_steps_run_and_report(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), "--smoke", "--only", *STEPS],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "gpu_check.json") as handle:
        steps = json.load(handle)["steps"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert set(steps) == set(STEPS)
    for name in STEPS:
        assert steps[name]["status"] == "ok", f"{name} failed:\n{log[-3000:]}"
        assert "result" in steps[name], f"{name} wrote no result"
    # the train-step script measured each variant it was asked for against the floor
    step = steps["train_step_1b_online"]["result"]
    assert {"plain:layer", "fused:layer", "fused:weights", "fused:none"} <= set(step["variants"])
    assert all(v["s"]["median"] > 0 and v["ratio"] > 0 for v in step["variants"].values())
