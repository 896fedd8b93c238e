"""Layer-wise mode: its stitched layer-by-layer forward against the transformers model
itself, and the mode end to end through a stock mergekit-yaml merge."""

import json

import pytest
import torch
from conftest import (
    artifact_merge,
    lab_dam_config,
    mergekit_yaml,
    read_checkpoint,
    write_config,
)
from transformers import AutoConfig, AutoModelForCausalLM

from mergekit_dam.api import train as train_stage
from mergekit_dam.training.expert_group import stack_experts
from mergekit_dam.training.merged_model import MergedModel
from mergekit_dam.training.modes.layerwise import relative_error
from mergekit_dam.training.skeleton import build_skeleton

FAST = {"steps": 25, "lr": 0.02, "max_length": 24, "batch_size": 4, "samples": 40, "train_device": "cpu"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied lm_head
def test_stitched_layers_reproduce_the_model(arch, families):
    _, *experts = families[arch]
    states = [read_checkpoint(m) for m in experts]
    config = AutoConfig.from_pretrained(experts[0])
    view = MergedModel(build_skeleton(config, torch.device("cpu")), {n: stack_experts([s[n] for s in states], torch.device("cpu"), torch.float32) for n in states[0]})
    input_ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    for index, expert in enumerate(experts):
        embed = view.groups["embed"](index)[0]
        hidden = view.embedding_output(input_ids, mask, embed)
        for b in range(len(view.blocks) - 1):
            hidden = view.layer_output(b, index, hidden, mask)[0]
        outer = {**view.groups["head"](index)[0], **(embed if arch == "qwen2" else {})}
        logits = view.final_logits(index, hidden, mask, outer)[0]
        reference = AutoModelForCausalLM.from_pretrained(expert).eval()(input_ids=input_ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[mask.bool()], reference[mask.bool()], atol=1e-5, rtol=1e-5)


def test_relative_error_ignores_padding():
    target = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]])
    student = torch.tensor([[[0.0, 4.0], [0.0, 0.0]]])
    assert relative_error(student, target, torch.tensor([[1, 0]])).item() == pytest.approx(9 / 25)


def test_layerwise_trains_and_a_stock_merge_applies_it(lab, tmp_path):
    artifact = tmp_path / "c.safetensors"
    config_path = write_config(tmp_path / "dam.yml", lab_dam_config(lab, artifact, mode="layerwise", **FAST))
    result = mergekit_yaml(config_path, str(tmp_path / "out"))
    assert "layer-wise training" in result.stderr + result.stdout
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["mode"] == "layerwise" and report["stages"] == 3  # embed, layer 0, last layer + head
    assert len(report["loss_curve"]) == 3 * FAST["steps"]
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    assert sum(final.values()) < 0.7 * sum(start.values()), (start, final)
    out = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(artifact).items():
        torch.testing.assert_close(out[name].double(), value, atol=1e-5, rtol=1e-5)

    # the stitched baseline is the same merge as end-to-end's step 0: equal held-out KL
    train_stage(lab_dam_config(lab, tmp_path / "e2e.safetensors", **{**FAST, "steps": 1}))
    e2e = json.loads((tmp_path / "e2e.report.json").read_text())["held_out_kl"]["step_0_linear_average"]
    for row in start:
        assert start[row] == pytest.approx(e2e[row], rel=1e-4)


def test_layerwise_with_top_k_teachers_trains(lab, tmp_path):
    """The last stage's teacher is the top-K cache, built from the experts' own hidden states."""
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_dam_config(lab, artifact, mode="layerwise", teacher="topk", topk=16, **FAST))
    report = json.loads((tmp_path / "c.report.json").read_text())
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    assert sum(final.values()) < 0.8 * sum(start.values()), (start, final)
    last = [entry for entry in report["loss_curve"] if entry["stage"] == "last"]
    assert len(last) == FAST["steps"] and set(last[0]["kl"]) == set(lab["experts"])
