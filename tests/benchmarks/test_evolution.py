"""The evolutionary baseline's wiring (benchmarks/evolution.py) on the small lab: mergekit's
genome to a valid mergekit config, CMA-ES over it for two generations, the merged models
written and scored, and compute counted as the sum of the evaluations' tokens."""

import json
import os

import numpy as np
import pytest
import yaml
from conftest import SMALL_LAB, benchmark_script, read_checkpoint

from mergekit_dam.lab import Recipe, build
from mergekit_dam.tools.compare import Scorer

pytest.importorskip("cma")



@pytest.fixture(scope="module")
def evolution():
    return benchmark_script("evolution")


@pytest.fixture(scope="module")
def manifest(lab):
    """The small lab's manifest (the `lab` fixture built it; this reads it back)."""
    return build(os.path.dirname(lab["base"]), Recipe(**SMALL_LAB.__dict__), progress=False)


def calibration_tokens(manifest) -> int:
    """Forward tokens of one evaluation, counted independently: every calibration text
    (prompt and answer; the lab's tokenizer has one token per character) plus its
    end-of-sequence token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(manifest["base"])
    total = 0
    for entry in manifest["skills"].values():
        with open(entry["calibration"], encoding="utf-8") as handle:
            total += sum(len(tokenizer(json.loads(line)["text"])["input_ids"]) + 1 for line in handle if line.strip())
    return total


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear"])
def test_a_genotype_is_a_valid_mergekit_config(evolution, manifest, method):
    from mergekit.config import MergeConfiguration

    genome = evolution.make_genome(manifest, method)
    genotype = np.random.default_rng(0).uniform(-0.2, 1.2, genome.initial_genotype().numel())
    config = evolution.merge_config(genome, genotype)
    again = MergeConfiguration.model_validate(yaml.safe_load(config.to_yaml()))  # what a user would save and run
    assert again.model_dump() == config.model_dump()
    assert (config.merge_method, config.dtype) == (method, "float32")
    layers = SMALL_LAB.layers
    assert [tuple(s.sources[0].layer_range) for s in config.slices] == [(i, i + 1) for i in range(layers)]  # one gene set per layer
    genes = genotype.reshape(layers, len(manifest["skills"]), 1, -1)
    experts = [entry["expert"] for entry in manifest["skills"].values()]
    for layer, piece in enumerate(config.slices):
        sources = {str(s.model.model.path): s.parameters for s in piece.sources}
        assert (manifest["base"] in sources) == (method != "linear")
        for index, expert in enumerate(experts):
            assert sources[expert]["weight"] == pytest.approx(abs(genes[layer, index, 0, 0]))  # negative weights folded, as mergekit does
            if method == "ties":
                assert sources[expert]["density"] == pytest.approx(min(abs(genes[layer, index, 0, 1]), 1.0))


def test_exact_match_and_nll_are_compares(evolution, manifest):
    """The fitness's teacher-forced exact match and answer NLL equal compare's greedy exact
    match and NLL on the same prompt/answer records. Each expert on calibration prompts of its
    own skill, half of them answered by what the expert itself generates (where it ends with
    end-of-sequence), so that exact match is not 0 everywhere."""
    from transformers import AutoTokenizer

    examples = evolution.calibration_examples(manifest, limit=8)
    for skill, entry in manifest["skills"].items():
        with open(entry["calibration"], encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle][:8]
        assert [p + a for p, a in examples[skill]] == texts  # split, not changed
    score = evolution.CalibrationFitness(AutoTokenizer.from_pretrained(manifest["base"]), examples)
    echoed = 0
    for skill, entry in manifest["skills"].items():
        scorer = Scorer(entry["expert"])
        pairs = examples[skill]
        budget = max(len(a) for _, a in pairs) + 2  # compare's greedy budget (one token a character)
        generated = scorer.greedy([p for p, _ in pairs], budget)
        pairs = pairs + [(p, text) for (p, _), text in zip(pairs, generated) if len(text) < budget]
        echoed += len(pairs) - 8
        records = [{"prompt": p, "answer": a} for p, a in pairs]
        ours = score.skill_scores(scorer.model, records)
        assert ours["accuracy"] == scorer.accuracy(records)  # teacher-forced = generated, on this tokenizer
    assert echoed > 0


def test_two_generations_write_and_score_merges_and_count_compute(evolution, manifest, tmp_path):
    per = calibration_tokens(manifest)
    budgets = [(1.0, 3.0 * per), (2.0, 6.0 * per)]  # "DAM" = 3 evaluations: snapshots after 3 and 6
    record = evolution.evolve(manifest, "ties", budgets, str(tmp_path), seed=0, popsize=3, log=lambda _: None)

    assert record["tokens_per_evaluation"] == per
    assert record["evaluations"] == 6 and [g["evaluations"] for g in record["curve"]] == [3, 6]  # two generations
    assert record["compute"] == 6 * per == sum(per for _ in range(record["evaluations"]))
    assert [g["compute"] for g in record["curve"]] == [3 * per, 6 * per]
    assert record["cma_stop"] == {"maxfevals": 6}
    fitness = [g["best_fitness"] for g in record["curve"]]
    assert fitness == sorted(fitness)  # the best so far never gets worse

    first, second = record["budgets"]
    assert (first["evaluations"], second["evaluations"]) == (3, 6) and first["reached"] and second["reached"]
    assert first["compute"] <= first["compute_budget"] and second["compute"] <= second["compute_budget"]
    assert second["fitness"] >= first["fitness"]
    with open(tmp_path / "curve.json", encoding="utf-8") as handle:
        assert json.load(handle)["budgets"][1]["model"] == second["model"]
    assert not os.path.exists(tmp_path / "merging")  # the per-candidate merges are deleted

    # each snapshot is a complete model on disk; scored again, it gives what the search recorded
    for entry in (first, second):
        assert os.path.exists(entry["config"]) and read_checkpoint(entry["model"])
        scorer = Scorer(entry["model"])
        examples = evolution.calibration_examples(manifest)
        nll = [scorer.nll([{"prompt": p, "answer": a} for p, a in pairs]) for pairs in examples.values()]
        assert sum(nll) / len(nll) == pytest.approx(entry["scores"]["nll"], rel=1e-4)
        assert entry["fitness"] == pytest.approx(entry["scores"]["accuracy"] - entry["scores"]["nll"])


def test_dam_compute_counts_forward_backward_and_the_teachers(evolution):
    report = {"tokens": 1000, "held_out_kl": {"final": {"a": 0.1, "b": 0.2}}}
    assert evolution.dam_compute(report) == 3 * 1000 + 1000
    with pytest.raises(ValueError, match="tokens"):
        evolution.dam_compute({"held_out_kl": {"final": {"a": 0.1}}})


def test_compare_reports_compute(manifest, tmp_path, capsys):
    """`compare --compute NAME=FLOAT`: a compute column in the table and the JSON, and two
    more chart panels (quality against compute); bad values fail in one line."""
    from mergekit_dam.cli import main as cli
    from mergekit_dam.tools.charts import build_figure

    root = os.path.dirname(manifest["base"])
    models = [f"simple={manifest['base']}", f"searched={manifest['skills']['shift']['expert']}"]
    assert cli(["-q", "compare", "--lab", root, *models, "--compute", "simple=0", "--compute", "searched=12345",
                "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(" compute |") and lines[2].endswith("| 0 |") and lines[3].endswith("| 1.23e+04 |")
    with open(tmp_path / "compare.json", encoding="utf-8") as handle:
        results = json.load(handle)
    assert (results["simple"]["compute"], results["searched"]["compute"]) == (0.0, 12345.0)
    assert os.path.getsize(tmp_path / "compare.png") > 0
    titles = [axis.get_title() for axis in build_figure(results).axes]  # the chart compare drew, as a figure
    assert "exact match (higher is better)" in titles and "KL(expert || model) (lower is better)" in titles
    assert sorted(t for t in titles if "vs compute" in t) == ["mean KL to the expert vs compute (lower is better)",
                                                              "mean exact match vs compute (higher is better)"]

    for bad, message in (("other=1", "not among the models"), ("searched=lots", "must be a number"),
                         ("searched", "NAME=FLOAT"), ("searched=-1", "0 or more")):
        assert cli(["-q", "compare", "--lab", root, *models, "--compute", bad, "--out", str(tmp_path / "bad")]) == 1
        assert message in capsys.readouterr().err
