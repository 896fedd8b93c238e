"""The peers benchmark (benchmarks/peers.py) end to end on the small lab, so that it cannot
rot: fusion-bench's RegMean through our Llama glue, checked against RegMean's closed form
recomputed here from each expert's own inputs; a data-free method (TSV-M); mergekit's task
arithmetic tuned on validation under a budget; AdaMerging stopped by the budget; every model
scored by `mergekit-dam compare` and tabled with its compute."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import benchmark_script, read_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_dam.tools.compare import read_records

pytest.importorskip("fusion_bench")


@pytest.fixture(scope="module")
def peers():
    return benchmark_script("peers")


@pytest.fixture(scope="module")
def run(peers, lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("peers")
    lab_dir = os.path.dirname(lab["base"])
    summary = peers.main(["--lab", lab_dir, "--work", str(work), "--strict", "--methods", "regmean,tsvm,task_arithmetic_tuned,adamerging",
                          "--budget-minutes", "0.001", "--adamerging-steps", "50"])
    return summary, work, peers.Setup.from_lab(lab_dir)


def inputs_gram(model, texts, tokenizer, module_name: str) -> torch.Tensor:
    """Mean of x xᵀ over every token's input to one linear layer: RegMean's Gram matrix."""
    rows = []
    handle = dict(model.named_modules())[module_name].register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
    handle.remove()
    x = torch.cat(rows)
    return x.T @ x / x.shape[0]


def test_regmean_through_the_glue_is_regmean_on_each_experts_own_inputs(run):
    summary, work, setup = run
    tokenizer = AutoTokenizer.from_pretrained(setup.base)
    name = "model.layers.1.mlp.down_proj"
    grams, weights = [], []
    for skill, expert in setup.experts.items():
        model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32)
        texts = [r["text"] for r in read_records(setup.calibration[skill])]
        gram = inputs_gram(model, texts, tokenizer, name)
        gram = gram * 0.6 + torch.diag(torch.diag(gram)) * 0.4  # off-diagonal x 0.6, fusion-bench's GPT-2 default
        grams.append(gram)
        weights.append(read_checkpoint(expert)[name + ".weight"])
    expected = (torch.linalg.inv(sum(grams)) @ sum(g @ w.T for g, w in zip(grams, weights))).T
    merged = read_checkpoint(os.path.join(work, "regmean"))[name + ".weight"]
    torch.testing.assert_close(merged, expected, rtol=1e-3, atol=1e-4)
    tokens = sum(len(tokenizer(r["text"])["input_ids"]) for path in setup.calibration.values() for r in read_records(path))
    assert summary["methods"]["regmean"]["compute"] == tokens  # one forward of every calibration token


def test_every_method_is_scored_by_compare_and_tabled_with_its_compute(run):
    summary, work, setup = run
    for name in ("regmean", "tsvm", "task_arithmetic_tuned", "adamerging"):
        assert set(summary["scores"][name]) >= set(setup.held_out)
        assert summary["methods"][name]["seconds"] > 0
    assert summary["methods"]["tsvm"]["compute"] == 0  # data-free
    for skill in setup.held_out:  # retention over the per-model scores, against the base and the experts
        assert summary["scores"][f"expert_{skill}"]["retention"][skill]["nll"] == pytest.approx(1.0)
        assert summary["scores"]["base"]["retention"][skill]["nll"] == pytest.approx(0.0)
    base, tsvm = read_checkpoint(setup.base), read_checkpoint(os.path.join(work, "tsvm"))
    assert any(not torch.equal(base[k], tsvm[k]) for k in base)
    with open(os.path.join(work, "results.md"), encoding="utf-8") as handle:
        table = handle.read()
    assert all(f"| {name} |" in table for name in ("base", "regmean", "tsvm", "task_arithmetic_tuned", "adamerging"))
    with open(os.path.join(work, "compare", "compare.json"), encoding="utf-8") as handle:
        assert json.load(handle)["regmean"]["compute"] == summary["methods"]["regmean"]["compute"]


def test_the_budget_stops_the_trained_peers(run, peers):
    summary, work, setup = run
    grid = summary["methods"]["task_arithmetic_tuned"]
    assert len(grid["trials"]) == 1 and grid["chosen"] == peers.GRIDS["task_arithmetic_tuned"][0]
    validation_tokens = peers.validation_fitness(setup, os.path.join(work, "task_arithmetic_tuned"))
    assert grid["trials"][0]["fitness"] == pytest.approx(validation_tokens[0])
    assert grid["compute"] == validation_tokens[1]
    assert 1 <= summary["methods"]["adamerging"]["steps"] < 50


def test_a_second_run_reuses_what_was_merged(run, peers):
    summary, work, setup = run
    scored = os.path.join(work, "compare", "regmean", "compare.json")
    scored_at = os.stat(scored).st_mtime_ns
    again = peers.main(["--setup", write_setup(setup, work), "--work", str(work), "--methods", "tsvm"])
    assert again["methods"]["regmean"]["seconds"] == summary["methods"]["regmean"]["seconds"]
    assert os.stat(scored).st_mtime_ns == scored_at  # each model's score is kept: a stopped scoring resumes
    assert again["scores"] == summary["scores"]


def write_setup(setup, work) -> str:
    from dataclasses import asdict

    path = os.path.join(work, "setup.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(asdict(setup), handle)
    return path


def test_a_method_that_fails_is_a_result_and_the_others_still_run(run, peers, monkeypatch, tmp_path):
    summary, work, setup = run

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(peers.METHODS, "iso_c", broken)
    again = peers.main(["--setup", write_setup(setup, tmp_path), "--work", str(work), "--methods", "iso_c,tsvm"])
    assert again["methods"]["iso_c"]["error"] == "RuntimeError: out of memory"
    assert "iso_c" not in again["scores"] and "tsvm" in again["scores"]
    with open(os.path.join(work, "results.md"), encoding="utf-8") as handle:
        assert "| iso_c | failed: RuntimeError: out of memory |" in handle.read()
    with pytest.raises(RuntimeError):
        peers.main(["--setup", write_setup(setup, tmp_path), "--work", str(work), "--methods", "iso_c", "--strict"])


def test_a_named_dam_run_merges_with_its_own_settings_over_the_shared_ones(peers, lab, monkeypatch, tmp_path):
    """--dam-run NAME:k=v adds a DAM merge of its own (here a retain set), beside `dam`; both take
    --dam's settings. The merge itself is mergekit-yaml's (stubbed: the config is what is checked)."""
    configs = {}
    monkeypatch.setattr(peers, "mergekit_yaml", lambda config, path, out, **kw: configs.setdefault(os.path.basename(out), config))
    monkeypatch.setattr(peers, "read_report", lambda artifact: {"tokens": 5, "held_out_kl": {"final": {"a": 0.1}}, "loss_curve": [{}]})
    monkeypatch.setattr(peers, "compare", lambda setup, models, results, out: {})
    summary = peers.main(["--lab", os.path.dirname(lab["base"]), "--work", str(tmp_path), "--methods", "dam,dam_retain",
                          "--dam", "steps=7", "--dam-run", "dam_retain:retain_dataset=/data/general.jsonl,retain_weight=2"])
    shared = {"seed": 0, "steps": 7}
    assert {k: v for k, v in configs["dam"]["parameters"].items() if k != "coefficients"} == shared
    assert {k: v for k, v in configs["dam_retain"]["parameters"].items() if k != "coefficients"} == \
        {**shared, "retain_dataset": "/data/general.jsonl", "retain_weight": 2}
    assert configs["dam_retain"]["parameters"]["coefficients"] == str(tmp_path / "dam_retain.safetensors")
    assert summary["methods"]["dam_retain"]["compute"] == 20 and summary["methods"]["dam_retain"]["settings"]["retain_weight"] == 2
    with pytest.raises(SystemExit):  # a name neither a method nor a --dam-run
        peers.parse_args(["--lab", "x", "--work", str(tmp_path), "--methods", "dam_other"])


def test_a_results_folder_goes_on_without_the_merged_models(run, peers, tmp_path):
    """--results keeps the small files: a later sitting with a fresh --work (the merged models
    gone) neither merges nor scores a method that is scored there."""
    summary, work, setup = run
    again = peers.main(["--setup", write_setup(setup, tmp_path), "--work", str(tmp_path / "fresh"), "--results", str(work),
                        "--methods", "regmean,tsvm"])
    assert not os.path.exists(tmp_path / "fresh" / "regmean")
    assert again["methods"]["regmean"] == summary["methods"]["regmean"]
    assert again["scores"] == summary["scores"]


def test_results_measured_on_other_files_are_not_continued(run, peers, tmp_path):
    summary, work, setup = run
    skill = next(iter(setup.held_out))
    records = read_records(setup.held_out[skill])
    changed = tmp_path / "held_out.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in records[1:]), encoding="utf-8")
    setup = dataclasses.replace(setup, held_out={**setup.held_out, skill: str(changed)})
    with pytest.raises(SystemExit, match=f"held_out_{skill} differ"):
        peers.main(["--setup", write_setup(setup, tmp_path), "--work", str(tmp_path / "w"), "--results", str(work), "--methods", "tsvm"])
