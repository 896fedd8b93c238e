"""The bad-input matrix: every row is an input, the error class and message fragment a user
sees, and a check that no output model, artifact or report was left behind."""

import json
import os
import shutil

import pytest
import torch
from conftest import lab_dam_config, read_checkpoint, small_lab
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file, save_file

from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.lab.tiny import make_config, make_tokenizer, save_model
from mergekit_dam.training import estimate

FAST = {"steps": 4, "max_length": 24, "batch_size": 2, "samples": 16}


def config_for(lab, tmp, data=True, **parameters):
    return lab_dam_config(lab, tmp / "c.safetensors", data, **{**FAST, **parameters})


def copy_model(source, target):
    shutil.copytree(source, target)
    return str(target)


def write_data(tmp, content, name="d.jsonl", binary=False):
    path = tmp / name
    path.write_bytes(content) if binary else path.write_text(content, encoding="utf-8")
    return str(path)


def with_dataset(path):
    def change(lab, tmp):
        config = config_for(lab, tmp)
        config["models"][1]["parameters"]["dataset"] = path(tmp) if callable(path) else path
        return config
    return change


def with_model(make):
    def change(lab, tmp):
        config = config_for(lab, tmp)
        config["models"][2]["model"] = make(lab, tmp)
        return config
    return change


def without_tensor(lab, tmp):
    target = copy_model(lab["experts"][2], tmp / "holey")
    tensors = load_file(os.path.join(target, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def without_config(lab, tmp):
    target = copy_model(lab["experts"][2], tmp / "configless")
    os.unlink(os.path.join(target, "config.json"))
    return target


def pickled(lab, tmp):
    target = copy_model(lab["experts"][2], tmp / "pickled")
    tensors = load_file(os.path.join(target, "model.safetensors"))
    os.unlink(os.path.join(target, "model.safetensors"))
    torch.save(tensors, os.path.join(target, "pytorch_model.bin"))
    return target


def other_vocab(lab, tmp):
    from transformers import AutoModelForCausalLM

    config = make_config("llama", hidden=32, layers=2, vocab=120)
    return save_model(AutoModelForCausalLM.from_config(config), str(tmp / "vocab120"), make_tokenizer())


def tied_base(lab, tmp):
    from transformers import AutoModelForCausalLM

    config = config_for(lab, tmp)
    model = AutoModelForCausalLM.from_config(make_config("llama", hidden=32, layers=2, tie=True))
    config["base_model"] = save_model(model, str(tmp / "tied_base"), make_tokenizer())
    return config


def apply_only_with(artifact_writer):
    def change(lab, tmp):
        artifact_writer(lab, str(tmp / "c.safetensors"))
        return config_for(lab, tmp, data=False)
    return change


def good_tables(lab, rows=None, nan=False, widen=False):
    tables = {name: torch.rand(len(rows or lab["experts"]), t.shape[-1] + (1 if widen and name == "model.norm.weight" else 0))
              for name, t in read_checkpoint(lab["experts"][0]).items()}
    if nan:
        tables["model.norm.weight"][0, 0] = float("inf")
    return tables


def with_nan(lab, tmp):
    target = copy_model(lab["experts"][2], tmp / "nan")
    tensors = load_file(os.path.join(target, "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_file(tensors, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def truncated(lab, path):
    write_artifact(path, good_tables(lab), lab["experts"])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def parameters(**changes):
    return lambda lab, tmp: config_for(lab, tmp, **changes)


CASES = [
    # config
    ("unknown parameter", parameters(stpes=3), DamError, "unknown parameter `stpes` in the top-level parameters (did you mean `steps`?)"),
    ("wrong type", parameters(batch_size="many"), DamError, "invalid value for `batch_size`"),
    ("zero steps", parameters(steps=0), DamError, "invalid value for `steps`"),
    ("negative steps", parameters(steps=-5), DamError, "invalid value for `steps`"),
    ("lr <= 0", parameters(lr=0), DamError, "invalid value for `lr`"),
    ("temperature <= 0", parameters(temperature=-1), DamError, "invalid value for `temperature`"),
    ("gradient per layer", parameters(lr=[0.1, 0.2]), DamError, "must be a single value"),
    ("filter per tensor", parameters(temperature=[{"filter": "mlp", "value": 1.0}, {"value": 2.0}]), DamError, "must be a single value"),
    ("include_base without base", lambda lab, tmp: {**config_for(lab, tmp, include_base=True), "base_model": None}, DamError, "`include_base: true` needs a `base_model:`"),
    ("topk with mse", parameters(teacher="topk", mse_weight=1.0), DamError, "mse_weight needs full expert logits"),
    ("layerwise with checkpoints", parameters(mode="layerwise", checkpoint_every=5), DamError, "checkpoint_every is not supported with mode: layerwise"),
    ("layerwise with processes", parameters(mode="layerwise", processes=2), DamError, "mode: layerwise runs in one process"),
    # models
    ("different architectures", with_model(lambda lab, tmp: small_lab_family(tmp)), RuntimeError, "allow-crimes"),
    ("different hidden sizes", with_model(lambda lab, tmp: small_lab(tmp / "wide", hidden=48, pretrain_steps=1, finetune_steps=1)["experts"][2]), DamError, "different shapes across inputs"),
    ("different layer counts", with_model(lambda lab, tmp: small_lab(tmp / "deep", layers=3, pretrain_steps=1, finetune_steps=1)["experts"][2]), DamError, "different numbers of layers"),
    ("different vocab sizes", with_model(other_vocab), DamError, "different shapes across inputs"),
    ("tied and untied mix", tied_base, DamError, "mix tied and untied embeddings"),
    ("missing tensor", with_model(without_tensor), DamError, "tensor model.layers.1.mlp.up_proj.weight is missing from"),
    ("pickle-only checkpoint", with_model(pickled), DamError, "only pickle (.bin) weights"),
    ("NaN in an expert's weights", with_model(with_nan), DamError, "nan has NaN or Inf values in tensor model.layers.0.self_attn.o_proj.weight"),
    ("missing model folder", with_model(lambda lab, tmp: str(tmp / "no-such-model")), DamError, "no-such-model does not exist (no such folder)"),
    ("model folder without config", with_model(without_config), DamError, "has no config.json; give a transformers checkpoint folder"),
    ("hub model not cached, no hub", with_model(lambda lab, tmp: "nobody-dam-test/no-such-model"), DamError,
     "model nobody-dam-test/no-such-model is "),  # offline or HF_HUB_OFFLINE: the reason differs, the fix does not
    # data
    ("missing data file", with_dataset(lambda tmp: str(tmp / "nope.jsonl")), DamError, "does not exist; fix the path"),
    ("data path is a folder", with_dataset(lambda tmp: (tmp / "folder").mkdir() or str(tmp / "folder")), DamError,
     "is a directory, not a file; give one of its"),
    ("empty data file", with_dataset(lambda tmp: write_data(tmp, "")), DamError, "is empty; give it examples or remove it"),
    ("wrong field", with_dataset(lambda tmp: write_data(tmp, '{"title": "x"}\n')), DamError, "(found: title); set `text_field`"),
    ("empty after tokenisation", with_dataset(lambda tmp: write_data(tmp, '{"text": ""}\n')), DamError, "no text after tokenisation"),
    ("every answer past max_length", with_dataset(lambda tmp: write_data(tmp, '{"prompt": "%s", "response": "4"}\n' % ("x" * 300) * 8)),
     DamError, "has no answer token to learn from: all 8 of its examples lose their answers (8 cut off by max_length"),
    ("non-UTF-8 text", with_dataset(lambda tmp: write_data(tmp, b"caf\xe9\n", "d.txt", binary=True)), DamError, "is not UTF-8 text (invalid continuation byte); re-encode it as UTF-8"),
    ("non-UTF-8 jsonl", with_dataset(lambda tmp: write_data(tmp, b'{"text": "caf\xe9 au lait"}\n', "d.jsonl", binary=True)), DamError, "is not UTF-8 text"),
    ("non-UTF-8 json", with_dataset(lambda tmp: write_data(tmp, b'[{"text": "na\xefve"}]', "d.json", binary=True)), DamError, "is not UTF-8 text"),
    ("non-UTF-8 csv", with_dataset(lambda tmp: write_data(tmp, b"text\nse\xf1or\n", "d.csv", binary=True)), DamError, "is not UTF-8 text"),
    ("UTF-16 jsonl", with_dataset(lambda tmp: write_data(tmp, '{"text": "hi"}\n'.encode("utf-16"), "d.jsonl", binary=True)), DamError, "is not UTF-8 text"),
    ("chat without template", with_dataset(lambda tmp: write_data(tmp, json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")), DamError, "no chat template"),
    # artifact
    ("foreign artifact format", apply_only_with(lambda lab, p: save_file({"w": torch.rand(4, 2)}, p, metadata={"format": "other/2"})), DamError, "is not a mergekit-dam artifact"),
    ("artifact for other models", apply_only_with(lambda lab, p: write_artifact(p, good_tables(lab, rows=lab["experts"][:3] + [lab["base"]]), lab["experts"][:3] + [lab["base"]])), DamError, "was made for models"),
    ("artifact with wrong shapes", apply_only_with(lambda lab, p: write_artifact(p, good_tables(lab, widen=True), lab["experts"])), DamError, "coefficients for model.norm.weight have shape"),
    ("artifact with Inf", apply_only_with(lambda lab, p: write_artifact(p, good_tables(lab, nan=True), lab["experts"])), DamError, "contain NaN or Inf"),
    ("truncated artifact", apply_only_with(truncated), DamError, "is not a readable safetensors file"),
    # training
    ("non-finite loss", parameters(lr=1e30, grad_clip=0, steps=6), DamError, "; lower `lr`"),
]


def small_lab_family(tmp):
    from mergekit_dam.lab.tiny import make_family

    return make_family(str(tmp / "qwen"), "qwen2", experts=1, hidden=32)[1]


def run(config, tmp):
    run_merge(MergeConfiguration.model_validate(config), str(tmp / "out"), MergeOptions(quiet=True))


@pytest.mark.parametrize("name, build_config, error, fragment", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_reported_and_nothing_is_written(lab, tmp_path, name, build_config, error, fragment):
    config = build_config(lab, tmp_path)
    artifact = tmp_path / "c.safetensors"
    before = artifact.read_bytes() if artifact.exists() else None
    with pytest.raises(error) as raised:
        run(config, tmp_path)
    assert fragment in str(raised.value), str(raised.value)
    if error is DamError:
        assert str(raised.value).startswith("dam: ") and "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists(), "no output model"
    assert (artifact.read_bytes() if artifact.exists() else None) == before, "no new or changed artifact"
    assert not (tmp_path / "c.report.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dam-")], "no temp files"


def test_memory_estimate_above_the_device_stops_before_training(lab, tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "available_memory", lambda device: 1024)
    with pytest.raises(DamError, match=r"training needs about .* GiB on cpu but 0.0 GiB is available; lower max_length"):
        run(config_for(lab, tmp_path), tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu(lab, tmp_path):
    with pytest.raises(DamError, match="no CUDA GPU is available; use train_device: cpu"):
        run(config_for(lab, tmp_path, train_device="cuda"), tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_the_artifact_write_is_one_line_and_leaves_nothing(lab, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def fill_the_disk(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 1000)  # part of the file made it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fill_the_disk)
    with pytest.raises(DamError) as raised:
        run(config_for(lab, tmp_path), tmp_path)
    message = str(raised.value)
    assert message.startswith("dam: cannot write ") and "c.safetensors: No space left on device; free space" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dam-")], "no temp files"


def test_a_full_disk_during_a_checkpoint_warns_and_training_goes_on(lab, tmp_path, monkeypatch, caplog):
    import errno

    from mergekit_dam.core.atomic import atomic_write
    from mergekit_dam.training import checkpoint

    def no_space(temp_path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_save", lambda path, tensors, metadata: atomic_write(path, no_space))
    run(config_for(lab, tmp_path, checkpoint_every=2), tmp_path)
    assert (tmp_path / "out").exists() and (tmp_path / "c.safetensors").exists()
    assert "c.ckpt: No space left on device; free space there or choose a writable location (training continues" in caplog.text
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dam-")], "no temp files"


def test_an_output_location_that_cannot_be_created_is_one_line(lab, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DamError, match=r"^dam: cannot create the output folder .*a-file/out \(.*a-file is a file, not a folder\); choose a writable location$"):
        run_merge(MergeConfiguration.model_validate(config_for(lab, tmp_path, data=False)), str(tmp_path / "a-file" / "out"),
                  MergeOptions(quiet=True))


def test_a_failure_after_the_merge_is_written_leaves_no_output_folder(lab, tmp_path, monkeypatch):
    """mergekit writes the output piece by piece; the model card comes last. A dam merge
    appears under its name only once mergekit has finished."""
    import mergekit.merge

    assert getattr(mergekit.merge.run_merge, "dam_guarded", False), "the registration hook wraps run_merge"

    def card_fails(**_):
        raise OSError("the hub could not be reached for the model card")

    config = config_for(lab, tmp_path, data=False)
    del config["parameters"]["coefficients"]  # equal coefficients: no training needed here
    monkeypatch.setattr(mergekit.merge, "generate_card", card_fails)
    with pytest.raises(OSError, match="model card"):
        run(config, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [], "neither the output folder nor a staging folder is left"
    monkeypatch.undo()
    run(config, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(tmp_path / "out"))
    assert "# out" in (tmp_path / "out" / "README.md").read_text(), "the card names the model as asked"
