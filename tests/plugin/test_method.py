"""`merge_method: dam` end to end through mergekit: the stock CLI, the Python API, and
checks of every output tensor against sum_i c_i * W_i recomputed from the checkpoints."""

import os
import subprocess

import pytest
import torch
import yaml
from conftest import (
    BIN,
    artifact_merge,
    artifact_rows,
    dam_config,
    expected_merge,
    lab_dam_config,
    mergekit_yaml,
    read_checkpoint,
    write_config,
)
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from mergekit.merge_methods import merge_state_dicts

from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.core.errors import DamError


def random_artifact(path, models, rows=None, seed=0, drop=None, widen=None):
    """Coefficients in [0, 1) for every tensor of the models; rows may be permuted."""
    rows = list(rows or models)
    generator = torch.Generator().manual_seed(seed)
    coefficients = {}
    for name, tensor in read_checkpoint(models[0]).items():
        if name == drop:
            continue
        width = tensor.shape[-1] if tensor.ndim else 1
        if name == widen:
            width += 1
        coefficients[name] = torch.rand(len(rows), width, generator=generator)
    write_artifact(str(path), coefficients, rows, {"steps": 0})
    return coefficients


def assert_merge_equals(out, models, coefficients, rows, atol=1e-5):
    merged = read_checkpoint(str(out))
    expected = expected_merge(models, coefficients, rows)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, atol=atol, rtol=1e-5, msg=name)


def merge(config, out, **options):
    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **options))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_applies_artifact_exactly(arch, families, tmp_path):
    base, *experts = families[arch]
    artifact = tmp_path / "coefficients.safetensors"
    coefficients = random_artifact(artifact, experts)
    config = dam_config(experts, base, {"coefficients": str(artifact)})
    if arch == "llama":  # the stock CLI in a fresh process: registration through the .pth hook
        mergekit_yaml(write_config(tmp_path / "dam.yml", config), str(tmp_path / "out"))
    else:
        merge(config, tmp_path / "out")
    assert_merge_equals(tmp_path / "out", experts, coefficients, experts)
    names = set(read_checkpoint(str(tmp_path / "out")))
    if arch == "qwen2":  # tied embeddings: no lm_head anywhere; q/k/v biases merged
        assert "lm_head.weight" not in names
        assert "model.layers.0.self_attn.q_proj.bias" in names
    else:
        assert "lm_head.weight" in names


def test_permuted_artifact_rows_give_the_same_merge(families, tmp_path):
    base, *experts = families["llama"]
    rows = [experts[2], experts[0], experts[1]]
    coefficients = random_artifact(tmp_path / "c.safetensors", experts, rows=rows, seed=3)
    config = dam_config(experts, base, {"coefficients": str(tmp_path / "c.safetensors")})
    merge(config, tmp_path / "out")
    assert_merge_equals(tmp_path / "out", experts, coefficients, rows)


def test_python_api_bfloat16_and_sharded_output(families, tmp_path):
    base, *experts = families["mistral"]
    coefficients = random_artifact(tmp_path / "c.safetensors", experts, seed=5)
    config = dam_config(experts, base, {"coefficients": str(tmp_path / "c.safetensors")}, dtype="bfloat16", out_dtype="float32")
    merge(config, tmp_path / "out", out_shard_size=20_000)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    merged = read_checkpoint(str(tmp_path / "out"))
    for name, table in coefficients.items():
        # inputs are bfloat16 (config dtype), summed in float32, returned in the input
        # dtype like mergekit's own methods, then saved as out_dtype
        expected = sum(read_checkpoint(m)[name].bfloat16().float() * table[i] for i, m in enumerate(experts))
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], expected.bfloat16().float(), atol=1e-6, rtol=2**-7, msg=name)


def test_no_artifact_no_data_is_equal_weights_without_base(families, tmp_path):
    base, *experts = families["llama"]
    merge(dam_config(experts, base), tmp_path / "out")
    equal = {name: torch.full((3, t.shape[-1]), 1 / 3) for name, t in read_checkpoint(experts[0]).items()}
    assert_merge_equals(tmp_path / "out", experts, equal, experts)


def test_include_base_gives_the_base_a_row(families, tmp_path):
    base, *experts = families["qwen2"]
    models = experts + [base]
    coefficients = random_artifact(tmp_path / "c.safetensors", models, seed=7)
    config = dam_config(experts, base, {"coefficients": str(tmp_path / "c.safetensors"), "include_base": True})
    merge(config, tmp_path / "out")
    assert_merge_equals(tmp_path / "out", models, coefficients, models)


def test_identity_slices_are_accepted(families, tmp_path):
    base, *experts = families["llama"]
    coefficients = random_artifact(tmp_path / "c.safetensors", experts[:2], seed=9)
    config = {
        "merge_method": "dam",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": m, "layer_range": [0, 1]} for m in experts[:2]]},
            {"sources": [{"model": m, "layer_range": [1, 2]} for m in experts[:2]]},
        ],
        "parameters": {"coefficients": str(tmp_path / "c.safetensors")},
    }
    merge(config, tmp_path / "out")
    assert_merge_equals(tmp_path / "out", experts[:2], coefficients, experts[:2])


def _expect_rejection(config, tmp_path, message):
    out = tmp_path / "out"
    with pytest.raises(DamError) as error:
        merge(config, out)
    assert message in str(error.value)
    assert not out.exists(), "nothing may be written when the setup is rejected"


def test_cli_rejection_is_one_line_and_exits_non_zero(families, tmp_path):
    _, *experts = families["llama"]
    out = tmp_path / "out"
    result = mergekit_yaml(write_config(tmp_path / "bad.yml", dam_config(experts, None, {"stpes": 3})), str(out), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("mergekit-dam error: dam: unknown parameter `stpes`")
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop="model.layers.1.mlp.up_proj.weight"), "no coefficients for tensor model.layers.1.mlp.up_proj.weight"),
        (dict(widen="model.norm.weight"), "coefficients for model.norm.weight have shape [3, 33]"),
        (dict(models_override=True), "was made for models"),
    ],
)
def test_mismatched_artifact_is_rejected_before_writing(families, tmp_path, change, message):
    base, *experts = families["llama"]
    models_override = change.pop("models_override", False)
    made_for = [experts[0], experts[1], base] if models_override else experts
    random_artifact(tmp_path / "c.safetensors", made_for, **change)
    _expect_rejection(dam_config(experts, base, {"coefficients": str(tmp_path / "c.safetensors")}), tmp_path, message)


def test_foreign_file_is_rejected(families, tmp_path):
    base, *experts = families["llama"]
    (tmp_path / "c.safetensors").write_bytes(b"not safetensors at all")
    _expect_rejection(dam_config(experts, base, {"coefficients": str(tmp_path / "c.safetensors")}), tmp_path, "not a readable safetensors file")


@pytest.mark.parametrize(
    "parameters, per_model, message",
    [
        ({"stpes": 10}, None, "unknown parameter `stpes` in the top-level parameters (did you mean `steps`?)"),
        (None, {"datset": "x.jsonl"}, "unknown parameter `datset`"),
        ({"dataset": "x.jsonl"}, None, "`dataset` belongs in a model's parameters"),
        (None, {"lr": 0.1}, "`lr` belongs in the top-level parameters"),
        ({"lr": [0.1, 0.2]}, None, "`lr` in the top-level parameters must be a single value"),
        ({"temperature": [{"filter": "mlp", "value": 1.0}, {"value": 2.0}]}, None, "must be a single value"),
        ({"steps": -1}, None, "invalid value for `steps`"),
        ({"lr": 0}, None, "invalid value for `lr`"),
        ({"include_base": True}, None, "`include_base: true` needs a `base_model:`"),
        ({"coefficients": "/nonexistent/c.safetensors"}, None, "does not exist"),
    ],
)
def test_bad_configs_are_rejected_before_writing(families, tmp_path, parameters, per_model, message):
    _, *experts = families["llama"]
    config = dam_config(experts, None, parameters)
    if per_model:
        config["models"][0]["parameters"] = per_model
    _expect_rejection(config, tmp_path, message)


def test_layer_moving_slices_are_rejected(families, tmp_path):
    _, *experts = families["llama"]
    config = {
        "merge_method": "dam",
        "slices": [{"sources": [{"model": m, "layer_range": [1, 2]} for m in experts[:2]]}],
    }
    _expect_rejection(config, tmp_path, "would be moved to output layer 0")


def test_merge_state_dicts_with_artifact_matches_rows_by_id(tmp_path):
    generator = torch.Generator().manual_seed(0)
    models = {name: {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)} for name in ("x", "y")}
    coefficients = {"w": torch.rand(2, 4, generator=generator), "b": torch.rand(2, 4, generator=generator)}
    write_artifact(str(tmp_path / "c.safetensors"), coefficients, ["y", "x"])
    merged = merge_state_dicts(models, "dam", parameters={"coefficients": str(tmp_path / "c.safetensors")})
    for name in ("w", "b"):
        expected = coefficients[name][1] * models["x"][name] + coefficients[name][0] * models["y"][name]
        torch.testing.assert_close(merged[name], expected)


def test_merge_state_dicts_rejects_unknown_parameters():
    with pytest.raises(TypeError, match="Unknown parameter"):
        merge_state_dicts([{"w": torch.ones(2)}, {"w": torch.ones(2)}], "dam", parameters={"stpes": 1})


def test_merge_state_dicts_without_artifact_averages_non_base_inputs():
    tensors = [torch.full((2, 2), float(v)) for v in (100, 1, 3)]
    merged = merge_state_dicts([{"w": t} for t in tensors], "dam", base=0)
    torch.testing.assert_close(merged["w"], torch.full((2, 2), 2.0))


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(cuda=True), dict(cuda=True, read_to_gpu=True, low_cpu_memory=True), dict(cuda=True, multi_gpu=True)])
def test_gpu_apply_matches(families, tmp_path, options):
    base, *experts = families["qwen2"]
    coefficients = random_artifact(tmp_path / "c.safetensors", experts, seed=11)
    merge(dam_config(experts, base, {"coefficients": str(tmp_path / "c.safetensors")}), tmp_path / "out", **options)
    assert_merge_equals(tmp_path / "out", experts, coefficients, experts)


def test_spec_parameters_carry_the_settings_descriptions():
    from mergekit.merge_methods import registry

    from mergekit_dam.core.settings import DamSettings, ModelSettings

    fields = {**DamSettings.model_fields, **ModelSettings.model_fields}
    parameters = registry.get("dam").spec.parameters
    assert [p.name for p in parameters] == list(fields)
    for parameter in parameters:
        assert parameter.description == fields[parameter.name].description and parameter.description


def test_dam_is_a_mergekit_multi_stage_reading_one_stage_and_feeding_another(lab, tmp_path):
    """mergekit's multi-stage pipeline (`mergekit-multi`, one process): a ties stage, a dam
    stage that takes it as one of its inputs, and a final linear merge of the two. Each output
    against its own recomputation from the checkpoints."""
    artifact = tmp_path / "dam.safetensors"
    experts, data = lab["experts"], lab["data"]
    # stages named otherwise than a method: mergekit-multi reads any string equal to a stage's
    # name as a reference to that stage, `merge_method: dam` included
    dam = lab_dam_config(lab, artifact, steps=4, seed=0)
    dam["models"] = [{"model": "merged_ties", "parameters": {"dataset": data[0]}},
                     *({"model": m, "parameters": {"dataset": d}} for m, d in zip(experts[2:], data[2:]))]
    stages = [
        {"name": "merged_ties", "merge_method": "ties", "base_model": lab["base"], "dtype": "float32",
         "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in experts[:2]]},
        {"name": "merged_dam", **dam},
        {"merge_method": "linear", "dtype": "float32",
         "models": [{"model": name, "parameters": {"weight": 0.5}} for name in ("merged_dam", "merged_ties")]},
    ]
    config = tmp_path / "pipeline.yml"
    config.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    stage_dir = tmp_path / "stages"
    done = subprocess.run([os.path.join(BIN, "mergekit-multi"), str(config), "-I", str(stage_dir),
                           "--out-path", str(tmp_path / "final")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    assert str(stage_dir / "merged_ties") in artifact_rows(artifact)  # DAM learned a row for the ties stage
    merged = read_checkpoint(str(stage_dir / "merged_dam"))
    for name, value in artifact_merge(artifact).items():  # the trained coefficients, applied exactly
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5, msg=name)
    ties, final = read_checkpoint(str(stage_dir / "merged_ties")), read_checkpoint(str(tmp_path / "final"))
    assert set(final) == set(merged)
    for name, value in final.items():
        torch.testing.assert_close(value, (merged[name] + ties[name]) / 2, atol=1e-6, rtol=1e-5, msg=name)
