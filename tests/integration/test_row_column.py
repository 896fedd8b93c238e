"""`granularity: row_column` (issue 28) end to end through mergekit on the small lab: every
decoder-layer matrix learns one factor per output row next to its column coefficients, the
artifact is format 2 with those rows, and mergekit's output is W_base + Σ (rᵢ ⊗ cᵢ) ⊙ (Wᵢ − W_base)
recomputed here from the input checkpoints; the rest merge as columns do."""

import json

import torch
from conftest import lab_config, merge, read_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_dam.core.artifact import FORMAT_ROWS, ROWS
from mergekit_dam.tools.inspect_artifact import summarize, text_summary

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_row_column_trains_rows_and_mergekit_applies_them_exactly(lab, tmp_path):
    artifact, out = tmp_path / "c.safetensors", tmp_path / "out"
    merge(lab_config(lab, artifact, granularity="row_column"), out)
    with safe_open(str(artifact), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == FORMAT_ROWS
    models, base = json.loads(metadata["models"]), json.loads(metadata["rows_complement"])
    assert base == lab["base"]
    tables = load_file(str(artifact))
    row_names = {name[: -len(ROWS)] for name in tables if name.endswith(ROWS)}
    assert row_names == {n for n in tables if n.startswith("model.layers.") and not n.endswith(ROWS) and n.split(".")[-2] in MATRICES}
    assert any(not torch.allclose(tables[n + ROWS], torch.ones_like(tables[n + ROWS])) for n in row_names), "the rows trained"

    inputs = {model: read_checkpoint(model) for model in models}
    merged, b = read_checkpoint(str(out)), models.index(base)
    for name in (n for n in tables if not n.endswith(ROWS)):
        weights = [inputs[m][name].double() for m in models]
        columns = tables[name].double()
        if name in row_names:  # W_base + Σ_{i≠base} (r_i ⊗ c_i) ⊙ (W_i − W_base)
            rows = tables[name + ROWS].double()
            expected = weights[b] + sum(rows[i][:, None] * columns[i][None, :] * (weights[i] - weights[b]) for i in range(len(models)) if i != b)
        else:  # Σ c_i W_i, the base's column row being 1 − Σ c_i
            expected = sum(c * w for c, w in zip(columns, weights))
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-5, rtol=1e-5)

    summary = summarize(str(artifact))
    assert set(summary["row_factors"]) == row_names and "Row factors" in text_summary(summary)
