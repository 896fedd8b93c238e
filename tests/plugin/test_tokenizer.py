"""The tokenizer training feeds every input with (plugin/tokenizer.py)."""

import shutil

import pytest
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from mergekit_dam.core.errors import DamError
from mergekit_dam.lab.tiny import make_tokenizer
from mergekit_dam.plugin.tokenizer import load_tokenizer


def config(**extra):
    return MergeConfiguration.model_validate({"merge_method": "linear", "models": [{"model": "/x", "parameters": {"weight": 1}}], **extra})


def test_the_skeleton_s_tokenizer_with_the_config_s_chat_template(families):
    models = [ModelReference.parse(path) for path in families["llama"]]
    tokenizer = load_tokenizer(models[0], models, config(chat_template="chatml"), trust_remote_code=False)
    assert tokenizer.get_vocab() and "<|im_start|>" in tokenizer.chat_template


def test_inputs_with_another_vocabulary_are_rejected(families, tmp_path):
    other = shutil.copytree(families["llama"][1], tmp_path / "other")
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(str(other))
    models = [ModelReference.parse(families["llama"][0]), ModelReference.parse(str(other))]
    with pytest.raises(DamError, match=r"has a different vocabulary than .* \(\d+ vs \d+ tokens\)"):
        load_tokenizer(models[0], models, config(), trust_remote_code=False)
    no_files = shutil.copytree(families["llama"][2], tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_files / name).unlink(missing_ok=True)
    assert load_tokenizer(models[0], [models[0], ModelReference.parse(str(no_files))], config(), False)  # nothing to compare
