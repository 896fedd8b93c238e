"""The DAM section of a merged model's card (the README.md mergekit writes): the data each
input was trained on, how training went, and where the coefficients are, so that a
shared merge can be reproduced without training again."""

from __future__ import annotations

import json
import os
from typing import Dict, List

from mergekit_dam.core.artifact import sidecar
from mergekit_dam.core.atomic import atomic_write_text


def datasets_of(config) -> Dict[str, str]:
    """Input model -> its `dataset`, from a config as written (before mergekit normalises
    it into modules and slices)."""
    inputs = [(m.model, m.parameters) for m in config.models or []]
    inputs += [(source.model, source.parameters) for output in config.slices or [] for source in output.sources]
    datasets = {str(model): parameters["dataset"] for model, parameters in inputs if isinstance((parameters or {}).get("dataset"), str)}
    retain = (config.parameters or {}).get("retain_dataset")
    if config.base_model is not None and isinstance(retain, str) and retain:
        datasets.setdefault(str(config.base_model), retain)  # the base's data: general text it keeps the merge close to
    return datasets


def dam_section(datasets: Dict[str, str], sources: List) -> str:
    """Markdown for the sources this merge used (prepared.CoefficientSource)."""
    lines = ["", "## DAM: Differentiable Adaptive Merging", ""]
    for source in sources:
        if source.artifact_path is None:
            lines += ["Coefficients: equal (1/N for every input: a linear average); no dataset was given.", ""]
            continue
        lines += [f"Coefficients: `{source.artifact_path}`. Give this file as `coefficients:` in the same config to",
                  "reproduce the merge without training (mergekit-dam checks it was made for these inputs).", ""]
        report = _read(sidecar(source.artifact_path, "report"))
        kl = (report or {}).get("held_out_kl", {})
        lines += ["| input | calibration data | held-out KL to it: linear average → DAM |", "|---|---|---|"]
        for row in source.rows:
            start, final = kl.get("step_0_linear_average", {}).get(row), kl.get("final", {}).get(row)
            change = f"{start:.4f} → {final:.4f}" if start is not None and final is not None else "not trained on"
            lines.append(f"| `{row}` | `{datasets.get(row, '-')}` | {change} |")
        if report:
            validation = report.get("validation") or {}
            kept = f", kept step {validation['best_step']} by validation KL" if "best_step" in validation else ""
            lines += ["", f"Training: {report.get('mode', 'end_to_end')}, {report.get('steps')} steps{kept}, "
                          f"{report.get('seconds', 0):.0f} s on {report.get('device')} ({report.get('dtype')}); "
                          f"report: `{sidecar(source.artifact_path, 'report')}`."]
        lines.append("")
    return "\n".join(lines)


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def add_to_card(out_path: str, datasets: Dict[str, str], sources: List) -> None:
    """Append the DAM section to `out_path`/README.md, if mergekit wrote one."""
    card = os.path.join(out_path, "README.md")
    sources = list(dict.fromkeys(sources))  # one per output slice: the same source repeated
    if not sources or not os.path.isfile(card):
        return
    with open(card, encoding="utf-8") as handle:
        text = handle.read()
    atomic_write_text(card, text.rstrip("\n") + "\n" + dam_section(datasets, sources))
