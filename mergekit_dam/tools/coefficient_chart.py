"""What tells the experts apart in DAM's coefficients, over several runs: `inspect`'s distinction
statistics (dominance, spread, correlation) as one heatmap row per run."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from mergekit_dam.tools.charts import FONT_SIZE
from mergekit_dam.tools.labels import LABEL_SIZE


def distinction_chart(runs: Sequence[Tuple[str, dict]], path: str, title: str, groups: Sequence[int] = ()) -> str:
    """One row per (label, stats) run, stats as `inspect`'s distinction averaged over tensors
    ({"spread", "correlation", "dominance": {model: share}}, what benchmarks/lab_variants.py
    writes): the dominance shares as a heatmap (a model a run did not merge: grey), then the
    spread and the correlation, each value written in its cell. `groups`: row indices before
    which a separating line is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models: List[str] = []
    for _, stats in runs:
        models += [m for m in stats["dominance"] if m not in models]
    models = [m for m in models if m != "base"] + [m for m in models if m == "base"]
    shares = np.array([[stats["dominance"].get(m, np.nan) for m in models] for _, stats in runs], dtype=float)
    spread = np.array([[stats["spread"]] for _, stats in runs], dtype=float)
    correlation = np.array([[np.nan if stats["correlation"] is None else stats["correlation"]] for _, stats in runs], dtype=float)
    labels = [label for label, _ in runs]
    short = [m.removeprefix("expert_").removeprefix("expert:") for m in models]
    with plt.rc_context({"font.size": FONT_SIZE}):
        figure, axes = plt.subplots(1, 3, figsize=(2.6 + 1.05 * len(models) + 2.6 + 0.09 * max(len(l) for l in labels), 1.2 + 0.5 * len(runs)),
                                    dpi=120, layout="constrained", gridspec_kw={"width_ratios": [len(models), 1.1, 1.1]})
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.88")
        image = axes[0].imshow(np.ma.masked_invalid(shares), aspect="auto", cmap=cmap, vmin=0, vmax=max(0.5, float(np.nanmax(shares))))
        _write_cells(axes[0], shares, image)
        axes[0].set_xticks(range(len(models)), short)
        axes[0].set_yticks(range(len(runs)), labels)
        axes[0].set_title("dominance: share of columns where\nthe model's coefficient is largest", fontsize=FONT_SIZE)
        figure.colorbar(image, ax=axes[0], location="bottom", shrink=0.6, pad=0.02, aspect=30)
        spread_map = matplotlib.colormaps["Greys"]
        image = axes[1].imshow(spread, aspect="auto", cmap=spread_map, vmin=0, vmax=max(1.5, float(np.nanmax(spread))))
        _write_cells(axes[1], spread, image)
        axes[1].set_title("spread\nacross models", fontsize=FONT_SIZE)
        corr_map = matplotlib.colormaps["coolwarm"].with_extremes(bad="0.88")
        image = axes[2].imshow(np.ma.masked_invalid(correlation), aspect="auto", cmap=corr_map, vmin=-1, vmax=1)
        _write_cells(axes[2], correlation, image)
        axes[2].set_title("correlation of\nmodels' rows", fontsize=FONT_SIZE)
        for axis in axes[1:]:
            axis.set_xticks([])
            axis.set_yticks([])
        for axis in axes:
            for row in groups:
                axis.axhline(row - 0.5, color="white", linewidth=4)
        figure.suptitle(title, fontsize=FONT_SIZE + 1)
        figure.savefig(path, dpi=figure.dpi)
    plt.close(figure)
    return path


def _write_cells(axis, values, image) -> None:
    import numpy as np

    for (row, column), value in np.ndenumerate(values):
        if np.isnan(value):
            axis.text(column, row, "–", ha="center", va="center", fontsize=LABEL_SIZE + 1, color="0.35")
            continue
        red, green, blue, _ = image.cmap(image.norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.55
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=LABEL_SIZE + 1, color="white" if dark else "black")
