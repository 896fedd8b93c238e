"""`mergekit-dam inspect`: what a coefficient artifact says, per tensor, layer and expert.

Per tensor and input model: mean, std, min, max of the coefficient vector. Per layer
and module type (q_proj, down_proj, input_layernorm, ...): each model's mean
coefficient, drawn as heatmaps (layer x model, one panel per module type).

Means hide what matters when experts share a base: whether the coefficients choose
between experts or only rescale columns for all of them alike. So per tensor also:
  spread     the mean over columns of the std across experts, over the mean |coefficient|
             (0: every expert gets the same coefficient in every column);
  correlation  the mean correlation between two experts' coefficient vectors
             (near 1: the rows move together, i.e. rescaling, not choosing);
  dominance  per expert, the share of columns where it has the largest coefficient,
drawn per layer and module type as a second heatmap.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional

from mergekit_dam.core.artifact import ROWS, open_artifact

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


def distinction(table) -> dict:
    """How a tensor's [N, D] coefficients tell the experts apart (see the module doc)."""
    import torch

    n = table.shape[0]
    spread = float(table.std(dim=0, unbiased=False).mean() / table.abs().mean().clamp_min(1e-12)) if n > 1 else 0.0
    centred = table - table.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    pairs = [float((centred[a] @ centred[b]) / (norms[a] * norms[b])) for a in range(n) for b in range(a + 1, n)
             if norms[a] > 1e-12 and norms[b] > 1e-12]
    winners = torch.bincount(table.argmax(dim=0), minlength=n).double() / table.shape[1]
    return {"spread": spread, "correlation": sum(pairs) / len(pairs) if pairs else None, "dominance": [float(w) for w in winners]}


def base_complement(models, provenance: dict, recorded: Optional[str] = None) -> Optional[str]:
    """The base's row of an artifact trained on task vectors (its coefficients are 1 − Σ of the
    experts', what the merged W = W_base + Σ cᵢ ⊙ (Wᵢ − W_base) gives it), or None: the row a
    row-column file records (`recorded`, Artifact.rows_complement), else (column files record
    none) the model without training data, when the settings say task_vectors."""
    if recorded is not None:
        return recorded
    if ((provenance.get("settings") or {}).get("parametrization")) != "task_vectors":
        return None
    untrained = [m for m in models if m not in (provenance.get("datasets") or {})]
    return untrained[0] if len(untrained) == 1 else None


def summarize(path: str) -> dict:
    artifact = open_artifact(path)
    models = artifact.models
    tensors, layers, distinctions, dominance, row_factors = {}, {}, {}, {}, {}
    for name in sorted(n for n in artifact.shapes if n.endswith(ROWS)):  # format /2: row factors, per model
        row_factors[name[: -len(ROWS)]] = {model: {"mean": float(row.mean()), "std": float(row.std()) if row.numel() > 1 else 0.0}
                                           for model, row in zip(models, artifact.get(name).double())}
    for name in sorted(n for n in artifact.shapes if not n.endswith(ROWS)):
        table = artifact.get(name).double()
        tensors[name] = {
            model: {"mean": float(row.mean()), "std": float(row.std()) if row.numel() > 1 else 0.0,
                    "min": float(row.min()), "max": float(row.max())}
            for model, row in zip(models, table)
        }
        distinctions[name] = distinction(table)
        layer, kind = module_of(name)
        if layer is not None:
            layers.setdefault(kind, {})[layer] = [float(row.mean()) for row in table]
            dominance.setdefault(kind, {})[layer] = distinctions[name]["dominance"]
    provenance = {k: artifact.provenance(k) for k in artifact.metadata if k not in ("format", "models")}
    return {"artifact": path, "models": models, "provenance": provenance, "base_complement": base_complement(models, provenance, artifact.rows_complement()),
            "tensors": tensors, "layers": layers, "distinction": distinctions, "dominance": dominance,
            "format": artifact.metadata["format"], "row_factors": row_factors, "rows_complement": artifact.rows_complement()}


def heatmap(summary: dict, path: str, grids: str = "layers", label: str = "mean coefficient",
            title: str = "DAM coefficients: mean per layer and input model") -> str:
    """Layer x model panels, one per module type, of summary[grids] (means, or dominance shares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(summary[grids])
    if not kinds:
        raise ValueError("the artifact has no per-layer tensors to draw")
    shown = list(range(len(summary["models"])))
    complement = summary.get("base_complement") if grids == "layers" else None
    if complement in summary["models"]:  # 1 − Σ: its column would stretch the scale and hide the experts' differences
        shown.remove(summary["models"].index(complement))
        title += "\n(task-vector weights; the base's row, 1 − their sum, is left out)"
    models = [os.path.basename(summary["models"][i].rstrip("/")) or summary["models"][i] for i in shown]
    columns = min(4, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    layer_count = max(len(layers) for layers in summary[grids].values())
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, rows * (1.8 + 0.22 * layer_count) + 0.8),
                                squeeze=False, layout="constrained")
    values = [layer[i] for kind in kinds for layer in summary[grids][kind].values() for i in shown]
    low, high = min(values), max(values)
    for axis, kind in zip(axes.flat, kinds):
        grid = [[summary[grids][kind][layer][i] for i in shown] for layer in sorted(summary[grids][kind])]
        image = axis.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        axis.set_title(kind, fontsize=9)
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        axis.set_yticks(range(len(grid)), sorted(summary[grids][kind]), fontsize=7)
        axis.set_ylabel("layer", fontsize=8)
    for axis in list(axes.flat)[len(kinds):]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label=label)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def report(path: str, out_dir: Optional[str] = None) -> Dict[str, str]:
    summary = summarize(path)
    out_dir = out_dir or os.path.splitext(path)[0] + ".inspect"
    os.makedirs(out_dir, exist_ok=True)
    outputs = {"json": os.path.join(out_dir, "coefficients.json"), "heatmap": os.path.join(out_dir, "heatmap.png"),
               "dominance": os.path.join(out_dir, "dominance.png")}
    with open(outputs["json"], "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    heatmap(summary, outputs["heatmap"])
    heatmap(summary, outputs["dominance"], "dominance", "share of columns where the model's coefficient is largest",
            "DAM coefficients: which input model dominates, per layer")
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
    lines += ["", "What distinguishes the models (per module type, averaged over tensors): spread across models "
              "relative to the mean |coefficient|, mean correlation between models' rows, share of columns each dominates.", "",
              "| module | spread | correlation | " + " | ".join(_short(m) for m in models) + " |", "|---" * (len(models) + 3) + "|"]
    groups: Dict[str, list] = {}
    for name, stats in summary["distinction"].items():
        groups.setdefault(module_of(name)[1], []).append(stats)
    for kind, stats in sorted(groups.items()):
        correlations = [s["correlation"] for s in stats if s["correlation"] is not None]
        correlation = f"{sum(correlations) / len(correlations):.3f}" if correlations else "-"
        shares = [sum(s["dominance"][i] for s in stats) / len(stats) for i in range(len(models))]
        lines.append(f"| {kind} | {sum(s['spread'] for s in stats) / len(stats):.3f} | {correlation} | "
                     + " | ".join(f"{share:.2f}" for share in shares) + " |")
    if summary.get("row_factors"):
        complement = summary.get("rows_complement")
        lines += ["", f"Row factors (granularity row_column) of {len(summary['row_factors'])} matrices, mean per model"
                  + (f" ({_short(complement)}: the complement, not read)" if complement else "") + ":", "",
                  "| module | " + " | ".join(_short(m) for m in models) + " |", "|---" * (len(models) + 1) + "|"]
        kinds: Dict[str, list] = {}
        for name, rows in summary["row_factors"].items():
            kinds.setdefault(module_of(name)[1], []).append(rows)
        for kind, entries in sorted(kinds.items()):
            lines.append(f"| {kind} | " + " | ".join(f"{sum(e[m]['mean'] for e in entries) / len(entries):.3f}" for m in models) + " |")
    return "\n".join(lines)


def _short(model: str) -> str:
    return os.path.basename(model.rstrip("/")) or model
