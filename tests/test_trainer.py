"""The training stage end to end on a tiny lab: experts fine-tuned from one base on
different skills. Merges run through mergekit's run_merge, checked independently."""

import json
import logging
import math
import os
import shutil

import pytest
import torch
from conftest import (
    artifact_merge,
    artifact_rows,
    expected_merge,
    lab_dam_config,
    linear_start,
    read_checkpoint,
    small_lab,
    write_config,
)
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.cli import main as cli
from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.lab import SKILLS
from mergekit_dam.lab.tiny import make_tokenizer
from mergekit_dam.plugin.prepared import PREPARED
from mergekit_dam.training import checkpoint

FAST = {"steps": 12, "lr": 0.02, "max_length": 24, "batch_size": 4, "samples": 40, "schedule": "constant"}  # the rate these tests were sized for


N = len(SKILLS)


def lab_config(lab, artifact, data=True, **parameters):
    return lab_dam_config(lab, artifact, data, **{**FAST, **parameters})


def merge(config, out, **options):
    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **options))


def update_agreement(a, b):
    """How closely two runs moved the coefficients away from 1/N: the relative error of
    b's updates against a's, and their cosine, over all tables together."""
    da = torch.cat([(a[n] - 1 / N).flatten() for n in sorted(a)]).double()
    db = torch.cat([(b[n] - 1 / N).flatten() for n in sorted(a)]).double()
    return float((db - da).norm() / da.norm()), float(torch.nn.functional.cosine_similarity(da, db, dim=0))


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
    config = lab_config({**lab, "data": [str(d) for d in data]}, tmp_path / "c.safetensors", steps=20)
    train_stage(config)
    report = json.loads((tmp_path / "c.report.json").read_text())
    final = report["held_out_kl"]["final"]
    assert set(report["training_kl"]) == set(final) == set(lab["experts"])
    for expert in final:
        assert report["training_kl"][expert] == pytest.approx(final[expert], rel=1e-5)
        assert final[expert] < report["held_out_kl"]["step_0_linear_average"][expert]


def test_reuse_retrain_and_determinism(lab, tmp_path, caplog, monkeypatch):
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact))
    first = load_file(str(artifact))
    stamp = os.stat(artifact).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        train_stage(lab_config(lab, artifact))
    assert "(no training)" in caplog.text and os.stat(artifact).st_mtime_ns == stamp
    monkeypatch.setattr(PREPARED, "trained", {})  # as in a new process: retrain really retrains
    train_stage(lab_config(lab, artifact, retrain=True))
    assert os.stat(artifact).st_mtime_ns != stamp
    again = load_file(str(artifact))
    assert all(torch.equal(first[name], again[name]) for name in first)  # same config + seed


def test_changed_hyperparameter_retrains(lab, tmp_path, caplog):
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact))
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        train_stage(lab_config(lab, artifact, temperature=1.0))
    assert "trained for other models, data or hyperparameters: retraining" in caplog.text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_after_interrupt_equals_uninterrupted(lab, tmp_path, monkeypatch, device):
    reference = tmp_path / "reference.safetensors"
    train_stage(lab_config(lab, reference, train_device=device))
    resumed = tmp_path / "resumed.safetensors"
    save = checkpoint.save_checkpoint

    def save_then_die(path, key, step, *args):
        save(path, key, step, *args)
        if step == 8:
            raise KeyboardInterrupt("simulated kill after the step-8 checkpoint")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_stage(lab_config(lab, resumed, checkpoint_every=4, train_device=device))
    assert not resumed.exists() and os.path.exists(str(resumed.with_suffix(".ckpt")))
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    train_stage(lab_config(lab, resumed, checkpoint_every=4, train_device=device))
    a, b = load_file(str(reference)), load_file(str(resumed))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not os.path.exists(str(resumed.with_suffix(".ckpt")))
    curve = json.loads((tmp_path / "resumed.report.json").read_text())["loss_curve"]
    assert [point["step"] for point in curve] == list(range(1, 13))


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


def test_cli_train_then_apply_only(lab, tmp_path):
    config = write_config(tmp_path / "dam.yml", lab_config(lab, tmp_path / "unused.safetensors"))
    assert cli(["-q", "train", config, "--out", str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").exists() and not (tmp_path / "unused.safetensors").exists()
    apply_only = lab_config(lab, tmp_path / "c.safetensors", data=False)
    merge(apply_only, tmp_path / "out")  # no datasets: the artifact is applied, nothing trains
    assert (tmp_path / "out" / "model.safetensors").exists()


def _reject(config, tmp_path, message):
    with pytest.raises(DamError, match=message):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize(
    "dataset, content, message",
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "", "cannot load dataset|is empty"),
        ("fields.jsonl", '{"title": "x"}\n', "found: title"),
    ],
)
def test_bad_data_writes_nothing(lab, tmp_path, dataset, content, message):
    if content is not None:
        (tmp_path / dataset).write_text(content)
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][1]["parameters"]["dataset"] = str(tmp_path / dataset)
    _reject(config, tmp_path, message)


def test_vocabulary_mismatch_is_rejected(lab, tmp_path):
    other = tmp_path / "other_expert"
    shutil.copytree(lab["experts"][2], other)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(str(other))
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][2]["model"] = str(other)
    _reject(config, tmp_path, "different vocabulary")


def test_non_finite_loss_stops_with_step_and_hint(lab, tmp_path):
    _reject(lab_config(lab, tmp_path / "c.safetensors", lr=1e30, grad_clip=0), tmp_path, r"loss became (nan|inf) at step \d+; lower `lr`")


def test_shape_mismatch_between_inputs_is_rejected(lab, tmp_path):
    wide = small_lab(tmp_path / "wide", hidden=48, pretrain_steps=1, finetune_steps=1)
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][2]["model"] = wide["experts"][2]
    _reject(config, tmp_path, "different shapes across inputs")


def test_architecture_mismatch_is_rejected(lab, families, tmp_path):
    config = lab_config(lab, tmp_path / "c.safetensors")
    config["models"][2]["model"] = families["qwen2"][1]
    with pytest.raises(RuntimeError, match="allow-crimes"):
        merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.safetensors").exists()


# --- on a CUDA GPU (`pytest -m gpu`; skipped without one) ------------------------------


@pytest.fixture(scope="module")
def cpu_reference(lab, tmp_path_factory):
    """The float32 CPU run of FAST, online and top-K teachers: what a GPU run is held to."""
    folder = tmp_path_factory.mktemp("cpu_reference")
    tables = {}
    for teacher in ("online", "topk"):
        train_stage(lab_config(lab, folder / f"{teacher}.safetensors", train_device="cpu", train_dtype="float32", teacher=teacher, topk=32))
        tables[teacher] = load_file(str(folder / f"{teacher}.safetensors"))
    return tables


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, teacher, tolerance", [
    ("float32", "online", 1e-2),
    ("float32", "topk", 1e-2),
    # bf16 expert stacks change the models themselves; on CPU bf16 vs float32 gives 0.02
    ("bfloat16", "online", 0.1),
])
def test_gpu_training_learns_what_the_cpu_learns(lab, tmp_path, cpu_reference, dtype, teacher, tolerance, record_property):
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact, train_device="cuda", train_dtype=dtype, teacher=teacher, topk=32))
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == dtype
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    assert sum(final.values()) < sum(start.values())
    error, cosine = update_agreement(cpu_reference[teacher], load_file(str(artifact)))
    record_property("update_relative_error", error)
    record_property("update_cosine", cosine)
    assert error < tolerance, (error, cosine)


@pytest.mark.gpu
def test_gpu_default_training_in_bfloat16_then_a_cuda_merge(lab, tmp_path, monkeypatch, record_property):
    """train_device auto on a GPU machine: bf16 expert stacks, fp32 coefficients; the same
    config trains to the same coefficients twice; mergekit --cuda applies them exactly."""
    artifact = tmp_path / "c.safetensors"
    merge(lab_config(lab, artifact, steps=60), tmp_path / "out", cuda=True)
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    start, final = report["held_out_kl"]["step_0_linear_average"], report["held_out_kl"]["final"]
    for expert in lab["experts"]:
        assert final[expert] < start[expert], (expert, start[expert], final[expert])
    record_property("held_out_kl", json.dumps({"start": start, "final": final}))
    record_property("peak_memory_bytes", report["peak_memory_bytes"])
    record_property("estimated_peak_bytes", report["estimate"]["peak_bytes"])
    coefficients = load_file(str(artifact))
    assert all(t.dtype == torch.float32 for t in coefficients.values())

    merged = read_checkpoint(str(tmp_path / "out"))
    for name, value in artifact_merge(artifact).items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(PREPARED, "trained", {})
    train_stage(lab_config(lab, tmp_path / "again.safetensors", steps=60))
    again = load_file(str(tmp_path / "again.safetensors"))
    record_property("rerun_max_abs_diff", max(float((again[n] - coefficients[n]).abs().max()) for n in coefficients))
    assert all(torch.equal(coefficients[n], again[n]) for n in coefficients)  # same config + seed, same device


def test_with_a_base_the_default_trains_task_vectors_and_applies_them_with_a_base_row(lab, tmp_path):
    artifact = tmp_path / "c.safetensors"
    merge(lab_config(lab, artifact, steps=30), tmp_path / "out")  # parametrization: auto
    tables = load_file(str(artifact))
    models = artifact_rows(artifact)
    assert models == lab["experts"] + [lab["base"]]
    assert json.loads(__import__("safetensors").safe_open(str(artifact), "pt").metadata()["settings"])["parametrization"] == "task_vectors"
    for name, table in tables.items():  # the base's coefficient is 1 - the experts' sum, column by column
        torch.testing.assert_close(table[-1], 1 - table[:-1].sum(0), msg=name)
    report = json.loads((tmp_path / "c.report.json").read_text())["held_out_kl"]
    assert sum(report["final"].values()) < 0.8 * sum(report["step_0_linear_average"].values())
    merged = read_checkpoint(str(tmp_path / "out"))
    for name, value in expected_merge(models, tables, models).items():
        torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)


def test_task_vector_start_is_the_linear_average_or_task_arithmetic(lab, tmp_path):
    for init, expert, base in ((None, 1 / N, 0.0), (0.5, 0.5, 1 - N * 0.5)):
        artifact = tmp_path / f"c{init}.safetensors"
        start = {} if init is None else {"init_weight": init}
        train_stage(lab_config(lab, artifact, parametrization="task_vectors", lr=1e-12, steps=1, **start))
        for table in load_file(str(artifact)).values():
            torch.testing.assert_close(table[:-1], torch.full_like(table[:-1], expert))
            torch.testing.assert_close(table[-1], torch.full_like(table[-1], base))


def test_artifacts_trained_with_weights_keep_their_meaning_under_the_default(lab, tmp_path, caplog, monkeypatch):
    """Before `auto`, a config with a base trained `weights` (no base row). The same
    config under the default reuses such an artifact instead of retraining, an apply-only
    config applies it, and `retrain: true` takes the new default."""
    artifact = tmp_path / "c.safetensors"
    train_stage(lab_config(lab, artifact, parametrization="weights"))
    assert artifact_rows(artifact) == lab["experts"]
    trained = load_file(str(artifact))
    monkeypatch.setattr(PREPARED, "trained", {})  # as a later run: the artifact on disk decides
    with caplog.at_level(logging.INFO, logger="mergekit_dam"):
        merge(lab_config(lab, artifact), tmp_path / "reused")
    assert "reusing coefficients" in caplog.text
    merge(lab_config(lab, artifact, data=False), tmp_path / "applied")
    for out in ("reused", "applied"):
        merged = read_checkpoint(str(tmp_path / out))
        for name, value in expected_merge(lab["experts"], trained, lab["experts"]).items():
            torch.testing.assert_close(merged[name].double(), value, atol=1e-5, rtol=1e-5)
    train_stage(lab_config(lab, artifact, retrain=True, steps=2))
    assert artifact_rows(artifact) == lab["experts"] + [lab["base"]]


def test_without_data_the_default_is_the_linear_average_and_task_vectors_give_task_arithmetic(lab, tmp_path):
    experts = [read_checkpoint(e) for e in lab["experts"]]
    base = read_checkpoint(lab["base"])
    merge(lab_dam_config(lab, "", data=False), tmp_path / "average")
    merge(lab_dam_config(lab, "", data=False, parametrization="task_vectors", init_weight=0.3), tmp_path / "arithmetic")
    average, arithmetic = read_checkpoint(str(tmp_path / "average")), read_checkpoint(str(tmp_path / "arithmetic"))
    for name in base:
        torch.testing.assert_close(average[name].double(), sum(e[name].double() for e in experts) / N, atol=1e-6, rtol=1e-6)
        vectors = sum(e[name].double() - base[name].double() for e in experts)
        torch.testing.assert_close(arithmetic[name].double(), base[name].double() + 0.3 * vectors, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("change, message", [
    ({"parametrization": "weights"}, "`retain_dataset` keeps the merge close to the base model, which needs a `base_model:` with a row"),
    ({"mode": "layerwise"}, "retain_dataset is supported with mode: end_to_end"),
])
def test_retain_dataset_without_a_base_row_is_one_line(lab, tmp_path, change, message):
    _reject(lab_config(lab, tmp_path / "c.safetensors", retain_dataset=lab["general"], **change), tmp_path, message)


def test_init_weight_without_a_base_is_one_line(lab, tmp_path):
    config = lab_config(lab, tmp_path / "c.safetensors", init_weight=0.5)
    del config["base_model"]
    _reject(config, tmp_path, "`init_weight` starts task vectors, which need a `base_model:`")


def test_task_vectors_need_a_base_model(lab, tmp_path):
    config = lab_config(lab, tmp_path / "c.safetensors", parametrization="task_vectors")
    del config["base_model"]
    _reject(config, tmp_path, "parametrization: task_vectors.*needs a `base_model:`")


def test_max_length_beyond_the_model_positions_is_cut_with_a_warning(lab, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mergekit_dam"):
        train_stage(lab_config(lab, tmp_path / "c.safetensors", max_length=100_000, steps=2))
    assert "max_length 100000 exceeds the model's max_position_embeddings 256; examples are cut at 256" in caplog.text


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_out_of_memory_mid_run_is_one_line_and_the_run_resumes(lab, tmp_path, monkeypatch, device):
    """On a GPU the allocator itself fails (a 16 TiB request at step 5); on CPU the error is raised."""
    from mergekit_dam.training.modes import end_to_end

    reference = tmp_path / "reference.safetensors"
    train_stage(lab_config(lab, reference, train_device=device))
    real, calls = end_to_end.micro_batch_loss, []

    def run_out_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            if device == "cuda":
                torch.empty(2**44, dtype=torch.uint8, device=device)
            raise torch.OutOfMemoryError("out of memory")
        return real(*args, **kwargs)

    artifact = tmp_path / "c.safetensors"
    monkeypatch.setattr(end_to_end, "micro_batch_loss", run_out_at_step_5)
    with pytest.raises(DamError, match=r"ran out of memory at step 5 \(peak .* GiB.*\); lower max_length .* the same command resumes"):
        train_stage(lab_config(lab, artifact, train_device=device))
    assert not artifact.exists() and os.path.exists(str(artifact.with_suffix(".ckpt")))
    monkeypatch.setattr(end_to_end, "micro_batch_loss", real)
    train_stage(lab_config(lab, artifact, train_device=device))
    a, b = load_file(str(reference)), load_file(str(artifact))
    assert all(torch.equal(a[name], b[name]) for name in a)


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
