"""`compare --lm-eval`: lm-evaluation-harness scores in compare's outputs, on the lab's own
lm-eval tasks, offline."""

import json
import os
import sys

import pytest
import yaml

from mergekit_dam.cli import main as cli
from mergekit_dam.lab.builder import write_lm_eval_tasks
from mergekit_dam.tools.compare import Scorer, read_records
from mergekit_dam.tools.harness import headline_scores

LIMIT = 8  # examples per task: enough to compare, fast on the tiny lab


@pytest.fixture
def offline(monkeypatch):
    """No Hugging Face hub access at all: the lab's tasks read local files only. The
    libraries read these variables at import, so their flags are set too."""
    import datasets.config
    import huggingface_hub.constants

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def direct_lm_eval(model: str, task: str, include: str) -> dict:
    """lm-eval run by hand on one model, as a user would, with its samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model}, tasks=[task], device="cpu",
                                   batch_size=8, limit=LIMIT, task_manager=TaskManager(include_path=include, include_defaults=False))


def test_compare_reports_what_lm_eval_itself_scores(lab, tmp_path, offline, capsys):
    pytest.importorskip("lm_eval")
    root, task, skill = os.path.dirname(lab["base"]), "dam_lab_shift", "shift"
    models = {"base": lab["base"], "expert_shift": lab["experts"][1]}
    assert cli(["-q", "compare", "--lab", root, *[f"{n}={p}" for n, p in models.items()], "--lm-eval", task,
                "--lm-eval-limit", str(LIMIT), "--out", str(tmp_path)]) == 0
    assert f"{task} exact_match |" in capsys.readouterr().out
    with open(tmp_path / "compare.json", encoding="utf-8") as handle:
        reported = json.load(handle)
    with open(os.path.join(root, "lm_eval_tasks", f"{task}.yaml"), encoding="utf-8") as handle:
        budget = yaml.safe_load(handle)["generation_kwargs"]["max_gen_toks"]
    records = read_records(os.path.join(root, "data", f"{skill}.held_out.jsonl"))[:LIMIT]
    for name, path in models.items():
        direct = direct_lm_eval(path, task, os.path.join(root, "lm_eval_tasks"))
        assert reported[name]["lm_eval"] == {task: {"exact_match,none": direct["results"][task]["exact_match,none"]}}
        # the task mirrors compare's exact match: the same greedy continuations, whatever the answers
        samples = sorted(direct["samples"][task], key=lambda sample: sample["doc_id"])
        ours = Scorer(path).greedy([r["prompt"] for r in records], budget)
        assert [s["filtered_resps"][0] for s in samples] == ours


def test_lab_style_task_scores_what_compare_scores(lab, tmp_path, offline):
    """On one held-out file, lm-eval's exact match through the lab's task format equals compare's
    own accuracy. Half the records are answered by what the expert itself generates (those
    it ends with end-of-sequence, so the answers' length does not change them), so the
    figure is not 0."""
    pytest.importorskip("lm_eval")
    root = os.path.dirname(lab["base"])
    records = read_records(os.path.join(root, "data", "shift.held_out.jsonl"))[:LIMIT]
    budget = max(len(r["answer"]) for r in records) + 2  # compare's greedy budget (one token a character)
    generated = Scorer(lab["experts"][1]).greedy([r["prompt"] for r in records], budget)
    records += [{"prompt": r["prompt"], "answer": text} for r, text in zip(records, generated) if len(text) < budget]
    held_out = tmp_path / "echo.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in records))
    include = write_lm_eval_tasks(str(tmp_path), {"echo": {"held_out": str(held_out)}})
    models = [f"base={lab['base']}", f"expert_shift={lab['experts'][1]}"]
    assert cli(["-q", "compare", *models, "--skill", f"echo={held_out}", "--lm-eval", "dam_lab_echo",
                "--lm-eval-include", include, "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "compare.json", encoding="utf-8") as handle:
        reported = json.load(handle)
    for entry in reported.values():
        assert entry["lm_eval"]["dam_lab_echo"]["exact_match,none"] == pytest.approx(entry["echo"]["accuracy"], abs=1e-12)
    assert reported["expert_shift"]["echo"]["accuracy"] >= (len(records) - LIMIT) / len(records) > 0


def test_without_lm_eval_it_fails_up_front_in_one_line(lab, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    root = os.path.dirname(lab["base"])
    assert cli(["-q", "compare", "--lab", root, lab["base"], "--lm-eval", "dam_lab", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mergekit-dam error: dam: "), error
    assert "pip install mergekit-dam[eval]" in error
    assert not (tmp_path / "out").exists()  # before any scoring


def test_a_group_reports_its_aggregate_and_a_group_without_one_its_members():
    def entry(value):
        return {"alias": "x", "sample_len": 4, "exact_match,none": value, "exact_match_stderr,none": 0.1}

    output = {"results": {"mmlu_a": entry(0.1), "mmlu_b": entry(0.3), "mmlu": entry(0.2), "gsm8k": entry(0.4),
                          "bundle": {"alias": "bundle"}, "x": entry(0.5), "y": entry(0.6)},
              "group_subtasks": {"mmlu": ["mmlu_a", "mmlu_b"], "bundle": ["x", "y"], "gsm8k": []}}
    assert headline_scores(output) == {"mmlu": {"exact_match,none": 0.2}, "gsm8k": {"exact_match,none": 0.4},
                                       "x": {"exact_match,none": 0.5}, "y": {"exact_match,none": 0.6}}


def test_a_task_lm_eval_does_not_know_fails_before_scoring(lab, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    class Index:  # lm-eval's task index, without its few seconds of reading every task YAML
        def __init__(self, include_path=None):
            self.all_tasks = ["dam_lab", "gsm8k"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    root = os.path.dirname(lab["base"])
    assert cli(["-q", "compare", "--lab", root, lab["base"], "--lm-eval", "gsm8k,gsm8kk", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "dam: lm-eval has no task gsm8kk or in " in error, error
    assert not (tmp_path / "out").exists()
