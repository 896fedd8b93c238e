"""What a dam merge checks before mergekit reads anything, through the stock CLI
(the registration hook wraps mergekit's run_merge): one line, exit 1, nothing written."""

import os
import subprocess

from conftest import BIN, dam_config, write_config


def mergekit_yaml_offline(config_path, out, *options, cwd=None):
    return subprocess.run([os.path.join(BIN, "mergekit-yaml"), str(config_path), str(out), *options], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_an_uncached_hub_model_offline_is_one_line_before_anything_is_read(lab, tmp_path):
    config = write_config(tmp_path / "c.yml", dam_config([*lab["experts"][:2], "nobody-dam-test/no-such-model"], base=lab["base"]))
    result = mergekit_yaml_offline(config, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mergekit-dam error: dam: model nobody-dam-test/no-such-model is not in the local Hugging Face cache and "
        "HF_HUB_OFFLINE is set; download it first (hf download nobody-dam-test/no-such-model) or give a local folder"]
    assert sorted(os.listdir(tmp_path)) == ["c.yml"]


def test_a_local_folder_shaped_like_a_hub_id_is_caught_before_the_card_needs_the_hub(lab, tmp_path):
    """mergekit's model card asks the hub about `owner/name` paths even when they exist
    locally, after the merge is written; offline that would fail at the very end."""
    os.symlink(os.path.dirname(lab["base"]), tmp_path / "lab")
    models = [os.path.join("lab", os.path.basename(m)) for m in lab["experts"][:2]]
    config = write_config(tmp_path / "c.yml", dam_config(models, base=os.path.join("lab", "base")))
    result = mergekit_yaml_offline(config, tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert "mergekit's model card will look up the local folder lab/" in result.stderr
    assert "write it as ./lab/" in result.stderr and "--no-write-model-card" in result.stderr
    assert not (tmp_path / "out").exists()
    result = mergekit_yaml_offline(config, tmp_path / "out", "--no-write-model-card", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dam-partial")]
