"""Interrupted, concurrent and stale runs, in real processes: SIGKILL during training and
during the artifact write, two mergekit-yaml runs at once, inputs edited in place, and
where a run writes files."""

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import BIN, lab_dam_config, write_config
from safetensors.torch import load_file, save_file

from mergekit_dam.api import train
from mergekit_dam.core.artifact import Artifact, write_artifact

FAST = {"max_length": 24, "batch_size": 2, "samples": 16, "seed": 0}


def lab_config(lab, artifact, **parameters):
    return lab_dam_config(lab, artifact, **{**FAST, **parameters})


def environment(tmp_path):
    return {**os.environ, "MERGEKIT_DAM_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}


def has_training_state(checkpoint: str) -> bool:
    """The checkpoint exists and holds a training step (not only the lr probe's scores)."""
    from safetensors import safe_open

    try:
        with safe_open(checkpoint, "pt") as handle:
            return "step" in (handle.metadata() or {})
    except Exception:  # not there yet
        return False


def test_sigkill_during_training_resumes_to_the_same_coefficients(lab, tmp_path):
    settings = {"steps": 120, "checkpoint_every": 10}
    reference = tmp_path / "reference.safetensors"
    train(lab_config(lab, reference, **settings))

    artifact = tmp_path / "killed.safetensors"
    config = write_config(tmp_path / "dam.yml", lab_config(lab, artifact, **settings))
    command = [os.path.join(BIN, "mergekit-dam"), "-q", "train", config]
    process = subprocess.Popen(command, env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = str(artifact.with_suffix(".ckpt"))
    deadline = time.time() + 120
    while not has_training_state(checkpoint) and process.poll() is None and time.time() < deadline:  # past the lr probe
        time.sleep(0.01)
    time.sleep(0.3)  # a few more steps past the checkpoint
    assert process.poll() is None, "training ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not artifact.exists() and os.path.exists(checkpoint)

    resumed = subprocess.run([os.path.join(BIN, "mergekit-dam"), "train", config], env=environment(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = load_file(str(reference)), load_file(str(artifact))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not os.path.exists(checkpoint)


WRITER = """
import sys, torch
from mergekit_dam.core.artifact import write_artifact
path, rows = sys.argv[1], ["a", "b"]
versions = [{f"t{i}": torch.full((2, 4096), float(v)) for i in range(64)} for v in (1, 2)]
write_artifact(path, versions[0], rows)
print("ready", flush=True)
k = 0
while True:
    k += 1
    write_artifact(path, versions[k % 2], rows)
"""


def test_sigkill_during_artifact_writes_never_leaves_a_torn_artifact(tmp_path):
    path = str(tmp_path / "c.safetensors")
    for delay in (0.05, 0.13, 0.31):
        process = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        artifact = Artifact(path)  # complete and readable: one of the two versions, whole
        values = {float(artifact.get(f"t{i}")[0, 0]) for i in range(64)}
        assert values in ({1.0}, {2.0}), values
        for i in range(64):
            table = artifact.get(f"t{i}")
            assert torch.equal(table, torch.full_like(table, table[0, 0]))


def test_the_next_write_removes_what_killed_writers_left(tmp_path):
    """SIGKILL leaves a writer no chance to remove its temp file; the next write in that
    folder removes it (its pid is gone), and never a live writer's."""
    path = str(tmp_path / "c.safetensors")
    leftovers = set()
    for delay in (0.05, 0.2):
        process = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        leftovers |= set(os.listdir(tmp_path)) - {"c.safetensors"}
    os.mkdir(tmp_path / f".dam-partial-{process.pid}-0123abcd")  # a killed merge's staging folder
    # what a writer killed inside safetensors' save_file leaves: its own temp file, next to
    # the file it writes, which here is inside the writer's private folder
    os.mkdir(tmp_path / f".dam-{process.pid}-0123abcd.tmp")
    (tmp_path / f".dam-{process.pid}-0123abcd.tmp" / ".tmpNLEYgs").write_bytes(b"\0" * 64)
    live = tmp_path / f".dam-{os.getpid()}-live.tmp"
    live.write_text("a write in progress in this process")
    write_artifact(path, {"t": torch.ones(2, 3)}, ["a", "b"])
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "c.safetensors"]), leftovers


SIBLING_TEMP_WRITER = """
import os, sys
from mergekit_dam.core.atomic import atomic_write

def write(temp_path):  # as safetensors' save_file does: its own temp file beside the target
    with open(os.path.join(os.path.dirname(temp_path), ".tmpNLEYgs"), "wb") as handle:
        handle.write(b"partial")
    os._exit(9)  # killed here: no cleanup runs

atomic_write(sys.argv[1], write)
"""


def test_a_library_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = str(tmp_path / "c.safetensors")
    process = subprocess.run([sys.executable, "-c", SIBLING_TEMP_WRITER, path])
    assert process.returncode == 9
    assert os.listdir(tmp_path), "the killed writer left something"
    write_artifact(path, {"t": torch.ones(2, 3)}, ["a", "b"])
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_two_concurrent_mergekit_runs_train_once_and_agree(lab, tmp_path):
    config = write_config(tmp_path / "dam.yml", lab_config(lab, tmp_path / "c.safetensors", steps=40))
    processes = [
        subprocess.Popen([os.path.join(BIN, "mergekit-yaml"), config, str(tmp_path / f"out{i}")],
                         env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)
    ]
    logs = [p.communicate()[1] for p in processes]
    assert all(p.returncode == 0 for p in processes), [log[-2000:] for log in logs]
    assert sum("dam: trained in" in log for log in logs) == 1
    assert sum("reusing coefficients" in log for log in logs) == 1
    first, second = load_file(str(tmp_path / "out0" / "model.safetensors")), load_file(str(tmp_path / "out1" / "model.safetensors"))
    assert all(torch.equal(first[name], second[name]) for name in first)
    Artifact(str(tmp_path / "c.safetensors"))  # readable, not torn


def test_stale_artifact_is_never_applied_after_inputs_change(lab, tmp_path, caplog):
    import logging
    import shutil

    experts = [shutil.copytree(m, tmp_path / f"expert{i}") for i, m in enumerate(lab["experts"])]
    data = [shutil.copy(d, tmp_path / f"data{i}.jsonl") for i, d in enumerate(lab["data"])]
    local = {"base": lab["base"], "experts": [str(e) for e in experts], "data": [str(d) for d in data]}
    artifact = tmp_path / "c.safetensors"
    from mergekit_dam.plugin.prepared import PREPARED

    def retrains(**parameters) -> bool:
        PREPARED.trained.clear()  # as a new process would
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mergekit_dam"):
            train(lab_config(local, artifact, steps=3, **parameters))
        return "retraining" in caplog.text or "dam: trained in" in caplog.text

    assert retrains()
    assert not retrains()  # same inputs: reused
    # one expert's weights edited in place, modification time restored
    weights = os.path.join(local["experts"][1], "model.safetensors")
    stamp = os.stat(weights)
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert retrains()
    # a dataset's content
    with open(local["data"][0], "a", encoding="utf-8") as handle:
        handle.write('{"text": "1+1=2"}\n')
    assert retrains()
    # the tokenizer of the skeleton model
    with open(os.path.join(local["experts"][0], "tokenizer_config.json"), "a", encoding="utf-8") as handle:
        handle.write(" ")
    assert retrains()
    assert not retrains()


def test_a_run_writes_only_to_its_output_artifact_and_cache_dirs(lab, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    config = write_config(tmp_path / "dam.yml", {**lab_config(lab, "", steps=3), "parameters": {**FAST, "steps": 3}})
    env = {**environment(tmp_path), "HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_OFFLINE": "1"}
    watched = [os.path.dirname(lab["base"]), str(work)]

    def listing():
        return {os.path.join(root, f) for path in watched for root, _, files in os.walk(path) for f in files}

    before = listing()
    result = subprocess.run([os.path.join(BIN, "mergekit-yaml"), config, str(work / "out")], cwd=work, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    new = {p for p in listing() - before if not p.startswith(str(work / "out"))}
    assert new == set(), new  # nothing next to the models or data, nothing else in the working dir
    cached = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
    assert "coefficients.safetensors" in cached and "coefficients.report.json" in cached


def stop_then_resume(lab, tmp_path, settings: dict, marker: str, number: int, merge: bool = False) -> tuple:
    """Run `mergekit-dam train` (`merge`: stock `mergekit-yaml`) until stderr shows `marker`,
    send signal `number`, then run the same command again; checks that the resumed
    coefficients are an uninterrupted run's. Returns (exit code, stderr after the signal,
    the rerun's stderr)."""
    reference = tmp_path / "reference.safetensors"
    train(lab_config(lab, reference, **settings))
    artifact = tmp_path / "stopped.safetensors"
    config = write_config(tmp_path / "dam.yml", lab_config(lab, artifact, **settings))
    command = ([os.path.join(BIN, "mergekit-yaml"), config, str(tmp_path / "out")] if merge
               else [os.path.join(BIN, "mergekit-dam"), "train", config])
    process = subprocess.Popen(command, env=environment(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while marker not in seen and process.poll() is None:
        seen += process.stderr.readline()
    assert process.poll() is None, "the run ended before the signal: " + seen[-2000:]
    process.send_signal(number)
    rest = process.stderr.read()
    code = process.wait()
    assert "Traceback" not in rest and not artifact.exists() and artifact.with_suffix(".ckpt").exists(), rest[-2000:]
    assert not (tmp_path / "out").exists()
    resumed = subprocess.run(command, env=environment(tmp_path), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(reference)), load_file(str(artifact))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not artifact.with_suffix(".ckpt").exists()
    return code, rest, resumed.stderr


def test_sigterm_checkpoints_and_the_same_command_resumes(lab, tmp_path):
    """Resume is on by default (checkpoint_minutes): SIGTERM ends the step, writes a
    checkpoint and exits 143; the same command resumes to what an uninterrupted run learns."""
    code, rest, resumed = stop_then_resume(lab, tmp_path, {"steps": 80}, "first step took", signal.SIGTERM)
    assert code == 143 and "stopped after step" in rest, rest[-2000:]
    assert "resuming from" in resumed


def test_ctrl_c_during_the_lr_probe_keeps_its_scores_and_the_same_command_resumes(lab, tmp_path):
    """SIGINT before the training steps (here in `lr: auto`'s probe of a stock mergekit-yaml
    run): exit 130 with one message saying what was kept, not mergekit's bare "Aborted!"; the rerun probes only the rates not yet measured and ends
    where an uninterrupted run does."""
    code, rest, resumed = stop_then_resume(lab, tmp_path, {"steps": 60, "lr": "auto"}, "DAM lr probe: 8/24", signal.SIGINT, merge=True)
    assert code == 130 and "dam: SIGINT: stopped; the lr probe's scores of 1 rate are kept in" in rest, rest[-2000:]
    assert "Aborted!" not in rest and (tmp_path / "out" / "config.json").exists()
    assert "lr probe: 1 rates already measured" in resumed
