"""What the training stage learns on a tiny lab (experts fine-tuned from one base on different
skills), and that the merge mergekit writes applies it, checked against sum_i c_i * W_i
recomputed from the checkpoints."""

import json
import logging
import math

import pytest
import torch
from conftest import FAST, N, artifact_merge, lab_config, linear_start, merge, read_checkpoint
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.lab.tiny import make_tokenizer


def test_training_lowers_held_out_kl_and_the_merge_applies_it(lab, tmp_path):
    artifact = tmp_path / "c.safetensors"
    merge(lab_config(lab, artifact, steps=60), tmp_path / "out")
    report = json.loads((tmp_path / "c.report.json").read_text())
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    assert set(start) == set(lab["experts"])
    for expert in lab["experts"]:
        assert final[expert] < 0.8 * start[expert], (expert, start[expert], final[expert])
    assert len(report["loss_curve"]) == 60 and report["device"] == "cpu" and report["peak_memory_bytes"] > 0
    assert set(report["training_kl"]) == set(start) and all(0 <= report["training_kl"][e] < start[e] for e in start)
    coefficients = load_file(str(artifact))
    merged = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(artifact).items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(t, torch.full_like(t, 1 / N)) for t in coefficients.values())


def test_the_kl_on_training_examples_is_the_held_out_measure(lab, tmp_path):
    """Each expert's data is one record many times over, so its training and held-out examples
    are the same sequence: the report's training KL, taken with the same coefficients, must be its
    final held-out KL."""
    data = []
    for k, path in enumerate(lab["data"]):
        with open(path, encoding="utf-8") as handle:
            record = handle.readline()
        data.append(tmp_path / f"same{k}.jsonl")
        data[-1].write_text(record * 30)
    config = lab_config({**lab, "data": [str(d) for d in data]}, tmp_path / "c.safetensors", steps=40)  # 20 left the recipe-2 small lab's shift above its start
    train_stage(config)
    report = json.loads((tmp_path / "c.report.json").read_text())
    final = report["held_out_kl"]["final"]
    assert set(report["training_kl"]) == set(final) == set(lab["experts"])
    for expert in final:
        assert report["training_kl"][expert] == pytest.approx(final[expert], rel=1e-5)
        assert final[expert] < report["held_out_kl"]["step_0_linear_average"][expert]


def test_topk_teacher_and_effective_nonlinear_coefficients(lab, tmp_path):
    source = train_stage(lab_config(lab, tmp_path / "topk.safetensors", teacher="topk", topk=32, steps=20))
    report = json.loads((tmp_path / "topk.report.json").read_text())["held_out_kl"]
    # top-K is an approximation of the full KL: on average the experts get closer
    assert sum(report["final"].values()) < 0.8 * sum(report["step_0_linear_average"].values())
    assert source.artifact_path == str(tmp_path / "topk.safetensors")
    # sigmoid parametrisation with a vanishing lr: the artifact holds f(raw) = 1/N, not raw
    # (and the base row of task vectors 1 - sum of them)
    train_stage(lab_config(lab, tmp_path / "sig.safetensors", nonlinearity="sigmoid", lr=1e-12, steps=2))
    start = linear_start(tmp_path / "sig.safetensors", lab["base"])
    for table in load_file(str(tmp_path / "sig.safetensors")).values():
        torch.testing.assert_close(table, start.expand_as(table))


def test_the_cached_teacher_learns_what_the_online_one_does(lab, tmp_path):
    """The same targets, computed once: the coefficients agree to float32 rounding (the
    cached logits come from other batch shapes), and auto caches the lab's small logits."""
    tables = {}
    for teacher in ("online", "cached", "auto"):
        train_stage(lab_config(lab, tmp_path / f"{teacher}.safetensors", teacher=teacher, steps=12, train_dtype="float32"))
        tables[teacher] = load_file(str(tmp_path / f"{teacher}.safetensors"))
        report = json.loads((tmp_path / f"{teacher}.report.json").read_text())
        assert report["teacher"] == ("cached" if teacher == "auto" else teacher)
    start = linear_start(tmp_path / "online.safetensors", lab["base"])
    moved = max((tables["online"][name] - start.expand_as(t)).abs().max().item() for name, t in tables["online"].items())
    assert moved > 1e-3  # training moved the coefficients, so agreeing says something
    for name, table in tables["online"].items():
        torch.testing.assert_close(tables["cached"][name], table, atol=1e-5, rtol=1e-4)
        assert torch.equal(tables["auto"][name], tables["cached"][name])


def test_frozen_kinds_keep_equal_coefficients(lab, tmp_path):
    train_stage(lab_config(lab, tmp_path / "c.safetensors", train_norms=False, train_embeddings=False))
    tables = load_file(str(tmp_path / "c.safetensors"))
    start = linear_start(tmp_path / "c.safetensors", lab["base"]).expand(-1, 32)
    torch.testing.assert_close(tables["model.norm.weight"], start, rtol=0, atol=1e-7)
    torch.testing.assert_close(tables["model.embed_tokens.weight"], start, rtol=0, atol=1e-7)
    assert not torch.allclose(tables["lm_head.weight"], start)


def test_include_base_and_chat_data(lab, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+{i}="}, {"role": "assistant", "content": str(2 * i)}]}) + "\n" for i in range(20)))
    config = lab_config(lab, tmp_path / "c.safetensors", include_base=True)
    config["models"][0]["parameters"]["dataset"] = str(chat)
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    merge(config, tmp_path / "out")
    metadata_models = json.loads(__import__("safetensors").safe_open(str(tmp_path / "c.safetensors"), "pt").metadata()["models"])
    assert metadata_models == lab["experts"] + [lab["base"]]
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert set(report["held_out_kl"]["final"]) == set(lab["experts"])  # the base has no data


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["end_to_end", "layerwise"])
def test_tied_embedding_family_trains(families, tmp_path, mode, device):
    base, *experts = families["qwen2"]
    data = tmp_path / "d.txt"
    data.write_text("\n".join(f"line {i} of text" for i in range(30)) + "\n")
    config = {
        "merge_method": "dam", "base_model": base, "dtype": "float32",
        "models": [{"model": experts[0], "parameters": {"dataset": str(data)}}, {"model": experts[1]}],
        "parameters": {"coefficients": str(tmp_path / "c.safetensors"), **FAST, "mode": mode, "train_device": device},
    }
    merge(config, tmp_path / "out")
    tables = load_file(str(tmp_path / "c.safetensors"))
    assert "lm_head.weight" not in tables and "model.layers.0.self_attn.q_proj.bias" in tables
    assert not torch.allclose(tables["model.embed_tokens.weight"], torch.full_like(tables["model.embed_tokens.weight"], 0.5))
    merged = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(tmp_path / "c.safetensors").items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)


def test_lr_auto_probes_the_grid_from_the_start_and_trains_as_the_chosen_rate_would(lab, tmp_path, caplog):
    from mergekit_dam.training.lr_probe import CANDIDATES

    auto = tmp_path / "auto.safetensors"
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        train_stage(lab_config(lab, auto, lr="auto", steps=20))
    report = json.loads((tmp_path / "auto.report.json").read_text())
    probe = report["lr_probe"]
    rates = [float(rate) for rate in probe]
    assert rates == sorted(rates) and set(rates) <= set(CANDIDATES) and {1e-2, 3e-2} <= set(rates) and len(rates) in (3, 4)
    scored = {float(rate): kl for rate, kl in probe.items() if kl is not None}
    assert report["lr"] == min(scored, key=scored.get) and len(set(scored.values())) > 1
    # where the climb stopped, the grid's neighbours of the choice were visited and are no better
    index = CANDIDATES.index(report["lr"])
    visited = {float(rate): math.inf if kl is None else kl for rate, kl in probe.items()}  # None: diverged
    for neighbour in CANDIDATES[max(0, index - 1) : index + 2]:
        assert neighbour in visited and visited[neighbour] >= visited[report["lr"]]
    assert f"lr: auto chose {report['lr']:g}" in caplog.text

    # the probe put the coefficients back: the run is the one an explicit lr gives
    chosen = tmp_path / "chosen.safetensors"
    train_stage(lab_config(lab, chosen, lr=report["lr"], steps=20))
    a, b = load_file(str(auto)), load_file(str(chosen))
    assert all(torch.equal(a[name], b[name]) for name in a)
    chosen_report = json.loads((tmp_path / "chosen.report.json").read_text())
    probe_steps = len(probe) * 5  # the visited rates, 5 steps each for a 20-step run
    per_step = chosen_report["tokens"] / 20
    assert report["tokens"] - chosen_report["tokens"] == pytest.approx(probe_steps * per_step, rel=0.35)
    # and the choice is deterministic: the same config again gives the same rate and coefficients
    again = tmp_path / "again.safetensors"
    train_stage(lab_config(lab, again, lr="auto", steps=20))
    assert json.loads((tmp_path / "again.report.json").read_text())["lr_probe"] == probe
    assert all(torch.equal(a[name], load_file(str(again))[name]) for name in a)


def _general_kl_to_base(lab, merged_dir) -> float:
    """KL(base ‖ merged) per token on the lab's held-out general text, with transformers alone."""
    from transformers import AutoModelForCausalLM

    from mergekit_dam.lab.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    texts = [json.loads(line)["text"] for line in open(lab["general_held_out"], encoding="utf-8") if line.strip()]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(lab["base"]).eval()(input_ids=batch, attention_mask=mask).logits.log_softmax(-1)
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()(input_ids=batch, attention_mask=mask).logits.log_softmax(-1)
    per_token = (base.exp() * (base - merged)).sum(-1)
    return float((per_token * mask).sum() / mask.sum())


def test_retain_dataset_keeps_the_merge_close_to_the_base_on_general_text(lab, tmp_path):
    merge(lab_config(lab, tmp_path / "plain.safetensors", steps=30), tmp_path / "plain")
    merge(lab_config(lab, tmp_path / "kept.safetensors", steps=30, retain_dataset=lab["general"], retain_weight=4.0), tmp_path / "kept")
    report = json.loads((tmp_path / "kept.report.json").read_text())
    assert set(report["held_out_kl"]["final"]) == set(lab["experts"]) | {lab["base"]}  # the retain data's KL is reported
    plain, kept = _general_kl_to_base(lab, tmp_path / "plain"), _general_kl_to_base(lab, tmp_path / "kept")
    assert kept < 0.8 * plain, (plain, kept)
    for name, value in artifact_merge(tmp_path / "kept.safetensors").items():  # applied exactly, as any artifact
        torch.testing.assert_close(read_checkpoint(str(tmp_path / "kept"))[name].double(), value, atol=1e-5, rtol=1e-5)
    assert "general.calibration.jsonl" in (tmp_path / "kept" / "README.md").read_text()  # the card names it


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_recompute_modes_train_the_same_coefficients(lab, tmp_path, caplog, device):
    """What backward keeps changes memory and time, not the result; `auto` logs its choice."""
    tables = {}
    for mode in ("layer", "weights", "none", "auto"):
        with caplog.at_level(logging.INFO, logger="mergekit_dam"):
            train_stage(lab_config(lab, tmp_path / f"{mode}.safetensors", recompute=mode, steps=4, train_device=device))
        tables[mode] = load_file(str(tmp_path / f"{mode}.safetensors"))
        report = json.loads((tmp_path / f"{mode}.report.json").read_text())
        assert report["estimate"]["recompute"] == ("weights" if mode == "auto" else mode)
    assert "recompute: weights" in caplog.text  # the tiny lab fits: auto keeps activations
    for mode in ("weights", "none", "auto"):
        for name, table in tables["layer"].items():
            torch.testing.assert_close(tables[mode][name], table, rtol=1e-6, atol=1e-7)


def test_packing_trains_what_padding_trains(lab, tmp_path, caplog):
    """Packed micro-batches compute the same loss on the same tokens without the padding:
    the coefficients agree to float32 rounding; `auto` checks the model and logs it packs."""
    tables = {}
    for mode in ("off", "auto"):
        with caplog.at_level(logging.INFO, logger="mergekit_dam"):
            train_stage(lab_config(lab, tmp_path / f"{mode}.safetensors", packing=mode, steps=8, teacher="online"))
        tables[mode] = load_file(str(tmp_path / f"{mode}.safetensors"))
        assert json.loads((tmp_path / f"{mode}.report.json").read_text())["packing"] is (mode == "auto")
    assert "packing: short examples share rows" in caplog.text
    start = linear_start(tmp_path / "off.safetensors", lab["base"])
    assert max((t - start.expand_as(t)).abs().max().item() for t in tables["off"].values()) > 1e-3
    for name, table in tables["off"].items():
        torch.testing.assert_close(tables["auto"][name], table, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("granularity", ["tensor", "layer"])
def test_coarser_granularity_trains_broadcast_tables_that_apply_exactly(lab, tmp_path, granularity):
    artifact = tmp_path / "c.safetensors"
    merge(lab_config(lab, artifact, granularity=granularity), tmp_path / "out")
    tables = load_file(str(artifact))
    assert any(not torch.allclose(t, torch.full_like(t, 1 / N)) for t in tables.values()), "it trained"
    for name, table in tables.items():  # one value per input row, repeated over the columns
        assert torch.equal(table, table[:, :1].expand_as(table)), name
    if granularity == "layer":  # and one per decoder layer: every tensor of layer 0 shares it
        layer0 = [t[:, 0] for name, t in tables.items() if name.startswith("model.layers.0.")]
        assert len(layer0) > 3 and all(torch.equal(v, layer0[0]) for v in layer0)
        assert not torch.equal(layer0[0], tables["model.layers.1.mlp.up_proj.weight"][:, 0])
    merged = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(artifact).items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)


def test_a_warm_start_begins_from_another_artifact(lab, tmp_path):
    first = tmp_path / "first.safetensors"
    train_stage(lab_config(lab, first))
    trained = load_file(str(first))
    # no learning: the run writes where it started, i.e. the first run's coefficients
    again = tmp_path / "again.safetensors"
    train_stage(lab_config(lab, again, init_from=str(first), lr=1e-12, steps=1))
    for name, table in load_file(str(again)).items():
        torch.testing.assert_close(table, trained[name], rtol=0, atol=1e-6)
    # coarser granularity starts from the column means
    coarse = tmp_path / "coarse.safetensors"
    train_stage(lab_config(lab, coarse, init_from=str(first), lr=1e-12, steps=1, granularity="tensor"))
    for name, table in load_file(str(coarse)).items():
        torch.testing.assert_close(table, trained[name].mean(dim=1, keepdim=True).expand_as(table), rtol=0, atol=1e-6)


def test_a_warm_start_from_other_models_is_refused(lab, tmp_path):
    other = tmp_path / "other.safetensors"
    write_artifact(str(other), {"model.norm.weight": torch.rand(2, 32)}, ["a", "b"])
    with pytest.raises(DamError, match="was made for models"):
        train_stage(lab_config(lab, tmp_path / "c.safetensors", init_from=str(other)))
