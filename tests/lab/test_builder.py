import json
import os
import shutil
from dataclasses import asdict

import pytest
import torch
from conftest import read_checkpoint

from mergekit_dam.cli import main as cli
from mergekit_dam.lab import builder as lab
from mergekit_dam.lab.builder import Recipe, build, check_reference, fingerprint
from mergekit_dam.lab.skills import SKILLS, skill_generators, split_of

TINY = Recipe(hidden=16, layers=1, pretrain_steps=3, finetune_steps=3, batch=4, calibration=8, validation=4, held_out=4)


def test_same_recipe_gives_identical_tensors_and_data(tmp_path):
    first, second = build(str(tmp_path / "a"), TINY, progress=False), build(str(tmp_path / "b"), TINY, progress=False)
    for a, b in [(first["base"], second["base"])] + [(first["skills"][s]["expert"], second["skills"][s]["expert"]) for s in SKILLS]:
        ta, tb = read_checkpoint(a), read_checkpoint(b)
        assert all(torch.equal(ta[n], tb[n]) for n in ta)
    for skill in SKILLS:
        for split in ("calibration", "validation", "held_out"):
            assert open(first["skills"][skill][split]).read() == open(second["skills"][skill][split]).read()


def test_reused_unless_the_recipe_changes(tmp_path):
    build(str(tmp_path), TINY, progress=False)
    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    build(str(tmp_path), TINY, progress=False)
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    changed = build(str(tmp_path), Recipe(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert changed["recipe"]["seed"] == 1
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns != stamp


def test_held_out_prompts_are_disjoint_from_training_and_answers_are_exact(tmp_path):
    manifest = build(str(tmp_path), TINY, progress=False)
    for skill in SKILLS:
        held = [json.loads(line) for line in open(manifest["skills"][skill]["held_out"])]
        assert all(split_of(r["prompt"]) == "held_out" for r in held)
        calibration = [json.loads(line)["text"] for line in open(manifest["skills"][skill]["calibration"])]
        assert not {r["prompt"] + r["answer"] for r in held} & set(calibration)
    generators = skill_generators(0)
    g = torch.Generator().manual_seed(0)
    prompt, answer = generators["arithmetic"](g)
    a, b = prompt.rstrip("=").split("+")
    assert int(answer) == int(a) + int(b)
    prompt, answer = generators["brackets"](g)
    assert len(answer) == len(prompt) - 1


def test_a_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    """mergekit reads a relative model name that is no local directory as a hub id (its model
    card step does, after training): the manifest names everything absolutely."""
    monkeypatch.chdir(tmp_path)
    manifest = build("lab", TINY, progress=False)
    assert manifest["base"] == str(tmp_path / "lab" / "base")
    assert all(os.path.isabs(path) for skill in manifest["skills"].values() for path in skill.values())


def test_a_lab_built_before_it_had_lm_eval_tasks_gets_them_from_lab_build(tmp_path, capsys):
    """Its models are kept; until then `compare --lm-eval` says what to run."""
    build(str(tmp_path), TINY, progress=False)
    manifest = json.loads((tmp_path / "lab.json").read_text())
    tasks = manifest.pop("lm_eval_tasks")
    (tmp_path / "lab.json").write_text(json.dumps(manifest))
    shutil.rmtree(tasks)
    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    assert build(str(tmp_path), TINY, progress=False)["lm_eval_tasks"] == tasks
    assert sorted(os.listdir(tasks)) == [f"dam_lab_{skill}.yaml" for skill in sorted(SKILLS)]
    assert json.loads((tmp_path / "lab.json").read_text())["lm_eval_tasks"] == tasks
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == stamp

    pytest.importorskip("lm_eval")  # the message below comes after the check that lm-eval is installed
    (tmp_path / "lab.json").write_text(json.dumps(manifest))
    assert cli(["-q", "compare", "--lab", str(tmp_path), manifest["base"], "--lm-eval", "dam_lab"]) == 1
    assert f"run `mergekit-dam lab build {tmp_path}`" in capsys.readouterr().err


def test_the_fingerprint_is_recorded_and_changes_with_one_ulp_of_one_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    manifest = build(str(tmp_path / "a"), TINY, progress=False)
    assert manifest["fingerprint"] == fingerprint(manifest) == build(str(tmp_path / "b"), TINY, progress=False)["fingerprint"]
    path = os.path.join(manifest["skills"]["shift"]["expert"], "model.safetensors")
    tensors = load_file(path)
    name = sorted(tensors)[0]
    flat = tensors[name].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    save_file(tensors, path, metadata={"format": "pt"})
    assert fingerprint(manifest) != manifest["fingerprint"]


def test_a_lab_without_a_fingerprint_gets_one_when_reused(tmp_path):
    manifest = build(str(tmp_path), TINY, progress=False)
    recorded = manifest.pop("fingerprint")
    (tmp_path / "lab.json").write_text(json.dumps(manifest))
    assert build(str(tmp_path), TINY, progress=False)["fingerprint"] == recorded
    assert json.loads((tmp_path / "lab.json").read_text())["fingerprint"] == recorded


@pytest.mark.parametrize("recipe, print_, expected, said", [
    (Recipe(), lab.REFERENCE_FINGERPRINT, True, "bit-identical to the reference build"),
    (Recipe(), "0" * 64, False, "differs from the reference build"),
    (TINY, lab.REFERENCE_FINGERPRINT, False, ""),  # only the default recipe has a reference
])
def test_check_reference_says_whether_the_lab_figures_apply(recipe, print_, expected, said, caplog):
    caplog.set_level("INFO", logger="mergekit_dam")
    assert check_reference({"recipe": asdict(recipe), "fingerprint": print_}) is expected
    assert said in caplog.text and (said or not caplog.text)


def test_each_expert_is_trained_to_its_validation_plateau_and_keeps_its_best_check(tmp_path):
    """The expert written is the best validation check's (exact match, then answer NLL; rescored
    here from the checkpoint), and the training stopped `patience` checks after the best."""
    from mergekit_dam.tools.compare import Scorer

    recipe = Recipe(**{**TINY.__dict__, "finetune_steps": 16, "finetune_check": 2, "finetune_patience": 2})
    manifest = build(str(tmp_path), recipe, progress=False)
    for skill in SKILLS:
        log = manifest["training"][skill]
        curve = log["curve"]
        assert [point["step"] for point in curve] == list(range(2, log["steps"] + 1, 2))
        def rank(i):  # the better check: higher exact match, then lower NLL, then the earlier
            return curve[i]["validation_accuracy"], -curve[i]["validation_nll"], -i
        best = max(range(len(curve)), key=rank)
        assert (log["best_step"], log["validation_accuracy"]) == (curve[best]["step"], curve[best]["validation_accuracy"])
        def stops(k):  # the rule at the k-th check: 2 checks since the best so far
            return k - max(range(k + 1), key=rank) >= 2
        assert not any(stops(k) for k in range(len(curve) - 1))
        assert log["steps"] == recipe.finetune_steps or stops(len(curve) - 1)
        validation = [json.loads(line) for line in open(manifest["skills"][skill]["validation"])]
        rescored = Scorer(manifest["skills"][skill]["expert"])
        assert rescored.accuracy(validation) == log["validation_accuracy"]
        assert rescored.nll(validation) == pytest.approx(log["validation_nll"], rel=1e-4)
