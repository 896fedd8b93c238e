"""`mergekit-dam inspect`: what a coefficient artifact says, per tensor, layer and expert.

Per tensor and input model: mean, std, min, max of the coefficient vector. Per layer
and module type (q_proj, down_proj, input_layernorm, ...): each model's mean
coefficient, drawn as heatmaps (layer x model, one panel per module type).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional

from mergekit_dam.plugin.artifact import open_artifact

LAYER = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<index>\d+)\.(?P<rest>.+)$")


def module_of(name: str) -> tuple:
    """(layer index or None, module type): `model.layers.3.mlp.up_proj.weight` -> (3, 'up_proj')."""
    match = LAYER.match(name)
    rest = match.group("rest") if match else name
    parts = rest.split(".")
    kind = parts[-2] if len(parts) >= 2 else parts[-1]
    if parts[-1] == "bias":
        kind += ".bias"
    return (int(match.group("index")) if match else None), kind


def summarize(path: str) -> dict:
    artifact = open_artifact(path)
    models = artifact.models
    tensors, layers = {}, {}
    for name in sorted(artifact.shapes):
        table = artifact.get(name).double()
        tensors[name] = {
            model: {"mean": float(row.mean()), "std": float(row.std()) if row.numel() > 1 else 0.0,
                    "min": float(row.min()), "max": float(row.max())}
            for model, row in zip(models, table)
        }
        layer, kind = module_of(name)
        if layer is not None:
            layers.setdefault(kind, {})[layer] = [float(row.mean()) for row in table]
    return {"artifact": path, "models": models, "provenance": {k: artifact.provenance(k) for k in artifact.metadata if k not in ("format", "models")},
            "tensors": tensors, "layers": layers}


def heatmap(summary: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(summary["layers"])
    models = [os.path.basename(m.rstrip("/")) or m for m in summary["models"]]
    if not kinds:
        raise ValueError("the artifact has no per-layer tensors to draw")
    columns = min(4, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    layer_count = max(len(layers) for layers in summary["layers"].values())
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, rows * (1.8 + 0.22 * layer_count) + 0.8),
                                squeeze=False, layout="constrained")
    values = [v for kind in kinds for layer in summary["layers"][kind].values() for v in layer]
    low, high = min(values), max(values)
    for axis, kind in zip(axes.flat, kinds):
        grid = [summary["layers"][kind][layer] for layer in sorted(summary["layers"][kind])]
        image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        axis.set_title(kind, fontsize=9)
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        axis.set_yticks(range(len(grid)), sorted(summary["layers"][kind]), fontsize=7)
        axis.set_ylabel("layer", fontsize=8)
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="mean coefficient")
    figure.suptitle("DAM coefficients: mean per layer and input model", fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def report(path: str, out_dir: Optional[str] = None) -> Dict[str, str]:
    summary = summarize(path)
    out_dir = out_dir or os.path.splitext(path)[0] + ".inspect"
    os.makedirs(out_dir, exist_ok=True)
    outputs = {"json": os.path.join(out_dir, "coefficients.json"), "heatmap": os.path.join(out_dir, "heatmap.png")}
    with open(outputs["json"], "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    heatmap(summary, outputs["heatmap"])
    return outputs


def text_summary(summary: dict) -> str:
    """Per-model mean coefficient by module type, averaged over layers."""
    models = summary["models"]
    lines = ["| module | " + " | ".join(os.path.basename(m.rstrip("/")) or m for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for kind, layers in sorted(summary["layers"].items()):
        means = [sum(layer[i] for layer in layers.values()) / len(layers) for i in range(len(models))]
        lines.append(f"| {kind} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    for name, rows in summary["tensors"].items():
        if module_of(name)[0] is None:
            lines.append(f"| {name} | " + " | ".join(f"{rows[m]['mean']:.3f}" for m in models) + " |")
    return "\n".join(lines)
