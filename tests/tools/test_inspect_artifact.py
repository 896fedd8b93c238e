import torch

from mergekit_dam.cli import main as cli
from mergekit_dam.core.artifact import write_artifact
from mergekit_dam.tools.inspect_artifact import (
    module_of,
    report,
    summarize,
    text_summary,
)


def test_module_names():
    assert module_of("model.layers.3.mlp.up_proj.weight") == (3, "up_proj")
    assert module_of("model.layers.0.self_attn.q_proj.bias") == (0, "q_proj.bias")
    assert module_of("model.layers.12.input_layernorm.weight") == (12, "input_layernorm")
    assert module_of("lm_head.weight") == (None, "lm_head")


def test_summary_statistics_heatmap_and_cli(tmp_path, capsys):
    tables = {
        "model.layers.0.mlp.up_proj.weight": torch.tensor([[1.0, 3.0], [0.0, 0.5]]),
        "model.layers.1.mlp.up_proj.weight": torch.tensor([[2.0, 2.0], [1.0, 0.0]]),
        "model.norm.weight": torch.tensor([[0.25, 0.75], [0.5, 0.5]]),
    }
    path = str(tmp_path / "c.safetensors")
    write_artifact(path, tables, ["a", "b"], {"steps": 3})
    summary = summarize(path)
    assert summary["layers"]["up_proj"] == {0: [2.0, 0.25], 1: [2.0, 0.5]}
    stats = summary["tensors"]["model.layers.0.mlp.up_proj.weight"]["a"]
    assert (stats["mean"], stats["min"], stats["max"]) == (2.0, 1.0, 3.0)
    assert abs(stats["std"] - 2**0.5) < 1e-9  # sample standard deviation of [1, 3]
    assert summary["provenance"]["steps"] == 3
    assert "| up_proj | 2.000 | 0.375 |" in text_summary(summary)
    # layer 0 up_proj: columns [1, 0] and [3, 0.5]; a dominates both; rows [1, 3] and [0, 0.5] correlate fully
    distinction = summary["distinction"]["model.layers.0.mlp.up_proj.weight"]
    assert distinction["dominance"] == [1.0, 0.0] and abs(distinction["correlation"] - 1.0) < 1e-12
    assert abs(distinction["spread"] - (0.5 + 1.25) / 2 / (4.5 / 4)) < 1e-12  # mean column std / mean |c|
    # layer 1: columns [2, 1] and [2, 0]: a dominates both; b's row [1, 0] against a's constant row: no correlation
    assert summary["dominance"]["up_proj"][1] == [1.0, 0.0]
    assert summary["distinction"]["model.layers.1.mlp.up_proj.weight"]["correlation"] is None
    assert "| norm | " in text_summary(summary).split("What distinguishes")[1]
    outputs = report(path, str(tmp_path / "out"))
    for picture in ("heatmap", "dominance"):
        with open(outputs[picture], "rb") as handle:
            assert handle.read(4) == b"\x89PNG"
    assert cli(["inspect", path, "--out", str(tmp_path / "cli")]) == 0
    assert "heatmap:" in capsys.readouterr().out


def test_cli_missing_artifact_is_one_line_and_quiet_works_after_the_subcommand(tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    assert cli(["inspect", missing, "-q"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot read coefficients file" in error and missing in error
    assert cli(["-q", "inspect", missing]) == 1


def test_a_task_vector_artifact_s_heatmap_leaves_out_the_base_s_complement(tmp_path, monkeypatch):
    """Trained on task vectors, the base's row is 1 − Σ of the experts' (here −0.8 against experts
    near 0.9): its column would set the colour scale and flatten the experts' differences."""
    import matplotlib.pyplot as plt

    tables = {f"model.layers.{i}.mlp.up_proj.weight": torch.tensor([[0.9 + 0.1 * i, 0.9], [0.9, 1.0 - 0.1 * i], [-0.8 - 0.1 * i, -0.9 + 0.1 * i]])
              for i in range(2)}
    path = str(tmp_path / "c.safetensors")
    provenance = {"settings": {"parametrization": "task_vectors"}, "datasets": {"x/a": {}, "x/b": {}}}
    write_artifact(path, tables, ["x/a", "x/b", "x/base"], provenance)
    summary = summarize(path)
    assert summary["base_complement"] == "x/base"
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: drawn.append(figure))
    outputs = report(path, str(tmp_path / "out"))
    means, dominance = drawn
    panel = means.axes[0]
    assert [t.get_text() for t in panel.get_xticklabels()] == ["a", "b"] and "1 − their sum, is left out" in means.texts[0].get_text()
    low, high = panel.images[0].get_clim()
    assert (round(low, 6), round(high, 6)) == (0.9, 0.95)  # the experts' means only (with the base: from -0.85)
    assert [t.get_text() for t in dominance.axes[0].get_xticklabels()] == ["a", "b", "base"]  # shares: every row
    for figure in drawn:
        close(figure)
    # trained on weights, every row is a model's own: all drawn
    write_artifact(path, tables, ["x/a", "x/b", "x/base"], {"settings": {"parametrization": "weights"}})
    assert summarize(path)["base_complement"] is None and outputs
    # a row-column file records its complement row itself, provenance or not
    rows = {**tables, "model.layers.0.mlp.up_proj.weight:rows": torch.ones(3, 4)}
    write_artifact(path, rows, ["x/a", "x/b", "x/base"], rows_complement="x/base")
    assert summarize(path)["base_complement"] == "x/base"
