"""Progress where nobody watches a bar (training/progress.py): a few plain lines with the
figures and the ETA instead of a bar's redraws, and nothing with --quiet."""

import os
import subprocess

from conftest import BIN, write_config

from mergekit_dam.training.progress import SparseProgress, progress_bar


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_five_percent_or_two_minutes_with_the_figures_and_the_eta(caplog):
    caplog.set_level("INFO", logger="mergekit_dam")
    clock = Clock()
    progress = SparseProgress(200, "DAM training", clock)
    for step in range(1, 201):
        clock.now = step * (10.0 if step == 50 else 0.5)  # step 50 after a long pause
        progress.update(1)
        progress.set_postfix(loss=f"{1 / step:.4f}")
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20
    assert lines[0] == "DAM training: 10/200 (5%) loss=0.1000 elapsed 0m05s, ETA 1m35s"
    assert lines[-1].startswith("DAM training: 200/200 (100%) loss=0.0050 elapsed 1m40s") and "ETA" not in lines[-1]


def test_a_resumed_run_s_eta_counts_only_the_steps_run_here(caplog):
    caplog.set_level("INFO", logger="mergekit_dam")
    clock = Clock()
    progress = SparseProgress(100, "DAM training", clock)
    progress.update(50)  # resumed at step 50
    for step in range(51, 57):
        clock.now += 2.0
        progress.update(1)
        progress.set_postfix(loss="1")
    assert [r.getMessage() for r in caplog.records] == ["DAM training: 51/100 (51%) loss=1 elapsed 0m02s, ETA 1m38s",
                                                        "DAM training: 56/100 (56%) loss=1 elapsed 0m12s, ETA 1m28s"]


def test_quiet_and_terminal_get_tqdm_and_a_pipe_gets_lines(tmp_path):
    with open(tmp_path / "log", "w") as pipe:
        assert isinstance(progress_bar(10, "x", stream=pipe), SparseProgress)
    assert not isinstance(progress_bar(10, "x", quiet=True), SparseProgress)


def _config(families, tmp_path, name: str, steps: int) -> str:
    base, *experts = families["llama"]
    data = tmp_path / "data.txt"
    data.write_text("".join(f"w{i} w{i + 1} w{i + 2}\n" for i in range(40)))
    return write_config(tmp_path / f"{name}.yml", {
        "merge_method": "dam", "base_model": base, "dtype": "float32",
        "models": [{"model": m, "parameters": {"dataset": str(data)}} for m in experts],
        "parameters": {"coefficients": str(tmp_path / f"{name}.safetensors"), "steps": steps, "lr": 0.01, "max_length": 16}})


def test_a_run_with_stderr_in_a_file_writes_a_few_progress_lines(families, tmp_path):
    config = _config(families, tmp_path, "c", 100)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        subprocess.run([os.path.join(BIN, "mergekit-dam"), "train", config], stderr=stderr, stdout=subprocess.DEVNULL, check=True)
    log = (tmp_path / "stderr.txt").read_text()
    progress = [line for line in log.splitlines() if line.startswith("DAM training: ")]
    assert "\r" not in log and len(progress) == 20 and progress[-1].startswith("DAM training: 100/100 (100%)")
    quiet = subprocess.run([os.path.join(BIN, "mergekit-dam"), "-q", "train", _config(families, tmp_path, "q", 10)],
                           capture_output=True, text=True, check=True)
    assert (tmp_path / "q.safetensors").exists() and quiet.stderr == ""  # trained, and said nothing
