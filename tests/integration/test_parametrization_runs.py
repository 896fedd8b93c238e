"""The parametrization a merge trains and applies (`auto`: task vectors with a base and data),
end to end."""

import json
import logging

import torch
from conftest import N, artifact_rows, expected_merge, lab_config, lab_dam_config, merge, read_checkpoint
from safetensors.torch import load_file

from mergekit_dam.api import train as train_stage
from mergekit_dam.plugin.prepared import PREPARED


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
