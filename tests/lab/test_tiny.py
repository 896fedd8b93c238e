"""Tiny model families for tests and benchmarks (lab/tiny.py)."""

import os

from conftest import read_checkpoint
from transformers import AutoConfig

from mergekit_dam.lab.tiny import make_family, make_tokenizer


def test_a_family_shares_a_geometry_and_a_tokenizer_and_its_experts_differ(tmp_path):
    base, *experts = make_family(str(tmp_path), "mistral", experts=2, hidden=16, layers=1)
    configs = [AutoConfig.from_pretrained(path) for path in (base, *experts)]
    assert {(c.model_type, c.hidden_size, c.num_hidden_layers) for c in configs} == {("mistral", 16, 1)}
    assert all(os.path.isfile(os.path.join(path, "tokenizer.json")) for path in (base, *experts))
    weights = [read_checkpoint(path) for path in (base, *experts)]
    assert all(set(w) == set(weights[0]) for w in weights)
    assert any(not (weights[1][name] == weights[2][name]).all() for name in weights[0])


def test_the_tokenizer_has_one_id_per_character():
    tokenizer = make_tokenizer()
    ids = tokenizer("ab1+")["input_ids"]
    assert len(ids) == 4 and tokenizer.decode(ids) == "ab1+"
