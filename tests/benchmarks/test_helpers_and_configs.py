"""The benchmark scripts' helpers (benchmarks/real_model.py, benchmarks/lab_variants.py,
benchmarks/packing_mask.py): the NAME:key=value syntax of a DAM run and the mergekit configs the
real-model benchmark writes, checked against configs written out by hand, the data that
lab_variants' `--calibration` writes, and the packed micro-batch of the packing check, against
its definition."""

import json
import os

import pytest
from conftest import benchmark_script

from mergekit_dam.lab.skills import split_of

_script = benchmark_script


@pytest.fixture(scope="module")
def real_model():
    return _script("real_model")


@pytest.fixture(scope="module")
def lab_variants():
    return _script("lab_variants")


def test_variant_syntax(lab_variants):
    assert lab_variants.variant("tv:parametrization=task_vectors,lr=0.01,keep_best=false") == (
        "tv", {"parametrization": "task_vectors", "lr": 0.01, "keep_best": False})
    assert lab_variants.variant("d:defaults,seed=2") == ("d", {"defaults": True, "seed": 2})
    assert lab_variants.variant("plain:") == ("plain", {})


def test_dam_runs_are_over_the_package_defaults(real_model):
    runs = real_model.dam_runs(["dam:", "w:defaults,parametrization=weights,max_minutes=4.5"])
    assert runs == {"dam": {"merge_method": "dam", "seed": 0},
                    "w": {"merge_method": "dam", "seed": 0, "parametrization": "weights", "max_minutes": 4.5}}


def test_real_model_merge_configs(real_model):
    experts = {"arithmetic": "/e/a", "shift": "/e/s"}
    calibration = {"arithmetic": "/d/a.jsonl", "shift": "/d/s.jsonl"}

    def config(name, spec):
        return real_model.merge_config(name, spec, "/b", experts, calibration, "/w")

    assert list(real_model.SIMPLE_MERGES) == ["linear", "task_arithmetic_0.5", "task_arithmetic_1.0", "ties", "dare_ties"]
    assert config("ties", real_model.SIMPLE_MERGES["ties"]) == {
        "merge_method": "ties", "dtype": "float32", "base_model": "/b", "parameters": {"normalize": True},
        "models": [{"model": "/e/a", "parameters": {"density": 0.5, "weight": 1.0}},
                   {"model": "/e/s", "parameters": {"density": 0.5, "weight": 1.0}}]}
    assert config("linear", real_model.SIMPLE_MERGES["linear"]) == {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": "/e/a", "parameters": {"weight": 1.0}}, {"model": "/e/s", "parameters": {"weight": 1.0}}]}
    assert config("t", real_model.SIMPLE_MERGES["task_arithmetic_1.0"])["models"][0]["parameters"] == {"weight": 1.0}
    assert config("t", real_model.SIMPLE_MERGES["task_arithmetic_0.5"])["models"][0]["parameters"] == {"weight": 0.5}
    assert config("dam", {"merge_method": "dam", "seed": 0, "lr": 0.01}) == {
        "merge_method": "dam", "base_model": "/b", "dtype": "float32",
        "models": [{"model": "/e/a", "parameters": {"dataset": "/d/a.jsonl"}},
                   {"model": "/e/s", "parameters": {"dataset": "/d/s.jsonl"}}],
        "parameters": {"coefficients": "/w/merges/dam.safetensors", "seed": 0, "lr": 0.01}}


def test_packing_mask_micro_batch_masks_each_packed_example_alone():
    """benchmarks/packing_mask.py (a check prepared for a lent GPU): its 4D mask lets a packed
    position see exactly the earlier positions of its own example, and the packed rows hold
    every padded example's tokens at its place, positions restarting at 0."""
    import torch

    padded, packed, mask4d = _script("packing_mask").micro_batch(12, 48, seed=3)
    seen = torch.zeros_like(packed.ids, dtype=torch.bool)
    for k, (row, start) in enumerate(packed.places):
        n = int(padded.mask[k].sum())
        assert torch.equal(packed.ids[row, start : start + n], padded.ids[k, :n])
        assert torch.equal(packed.position_ids[row, start : start + n], torch.arange(n))
        block = mask4d[row, 0, start : start + n]
        assert torch.equal(block[:, start : start + n], torch.tril(torch.ones(n, n, dtype=torch.bool)))
        assert not block[:, :start].any() and not block[:, start + n :].any()
        seen[row, start : start + n] = True
    assert int(seen.sum()) == int(padded.mask.sum())


def test_lab_variants_calibration_sets(lab_variants, tmp_path):
    """`held-out`: the scored prompts with their answers, as the lab's plain text; `fresh:N`: new
    draws from the fine-tuning split, none of them a scored prompt; `lab`: the manifest as it is."""
    held = tmp_path / "shift.held_out.jsonl"
    held.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in [("abc>", "BCD"), ("xy>", "YZ")]))
    manifest = {"base": "b", "skills": {"shift": {"expert": "e", "calibration": "lab.jsonl", "held_out": str(held)}}}
    assert lab_variants.calibration_sets(manifest, "lab", str(tmp_path)) is manifest

    upper = lab_variants.calibration_sets(manifest, "held-out", str(tmp_path))["skills"]["shift"]
    texts = [json.loads(line)["text"] for line in open(upper["calibration"])]
    assert texts == ["abc>BCD", "xy>YZ"] * lab_variants.HELD_OUT_COPIES and upper["expert"] == "e"

    fresh = lab_variants.calibration_sets(manifest, "fresh:30", str(tmp_path))["skills"]["shift"]
    texts = [json.loads(line)["text"] for line in open(fresh["calibration"])]
    assert len(texts) == 30
    for text in texts:
        prompt, answer = text.split(">")
        assert split_of(prompt + ">") == "train" and answer == "".join(chr((ord(c) - 97 + 1) % 26 + 65) for c in prompt)
    with pytest.raises(ValueError, match="fresh:N"):
        lab_variants.calibration_sets(manifest, "fresh", str(tmp_path))


def test_the_second_real_model_setups_skills_have_exact_answers(real_model):
    """The four-skill setup's samplers, against each skill's definition written out here."""
    import torch

    generators = real_model.more_generators()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        prompt, answer = generators["reverse"](g)
        assert prompt.endswith(">") and answer == "".join(reversed(prompt[:-1]))
        prompt, answer = generators["sort"](g)
        assert answer == "".join(sorted(prompt[:-1]))
        prompt, answer = generators["subtract"](g)
        a, b = prompt[:-1].split("-")
        assert len(a) == len(b) == 2 and b[0] != "0" and all(x >= y for x, y in zip(a, b)) and int(answer) == int(a) - int(b)
        prompt, answer = generators["initials"](g)
        assert answer == "".join(word[0] for word in prompt[:-1].split()).upper()
    assert real_model.present("reverse", "abc>", "cba") == ("a b c", "c b a")
    assert real_model.present("initials", "cold iron:", "CI") == ("cold iron:", "C I")  # the words kept, the letters apart
    assert real_model.present("subtract", "54-21=", "33") == ("54-21=", "33")


def test_real_model_data_adds_the_general_chat_records(real_model, tmp_path):
    from mergekit_dam.lab.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    paths = real_model.data(str(tmp_path), tokenizer, ["reverse", "subtract"], train=4, validation=2, held_out=2)
    general = [json.loads(line) for line in open(paths["general"], encoding="utf-8")]
    source = [json.loads(line) for line in open(real_model.GENERAL_CHAT, encoding="utf-8")]
    assert len(general) == len(source) == 48
    assert general[0] == {"prompt": f"<user>{source[0]['instruction']}<assistant>", "answer": source[0]["answer"]}
    assert len(open(paths["reverse"]["held_out"]).readlines()) == 2
