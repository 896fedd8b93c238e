"""Training checkpoints (safetensors, no pickle): the raw coefficients, AdamW's moments
and the loss history, whole tensors (gathered from the ranks when sharded), written by
rank 0 beside the artifact (`<artifact name>.ckpt`: core.artifact.sidecar) and valid only for the same training key."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Optional

import torch

from mergekit_dam.core.atomic import WriteError
from mergekit_dam.core.artifact import atomic_save, sidecar
from mergekit_dam.training import distributed

LOG = logging.getLogger("mergekit_dam")


def save_checkpoint(path: str, key: str, step: int, raw: Dict[str, torch.nn.Parameter], optimizer, history: list,
                    extra: tuple = ({}, {})) -> None:
    """Whole tensors (gathered from the ranks when sharded), written by rank 0; `extra`:
    (tensors, metadata) of the validation selection."""
    tensors = {f"raw/{name}": distributed.full(p.detach()) for name, p in raw.items()}
    tensors.update({name: distributed.full(t) for name, t in extra[0].items()})
    for name, p in raw.items():
        state = optimizer.state.get(p, {})
        for slot in ("exp_avg", "exp_avg_sq"):
            if slot in state:
                tensors[f"{slot}/{name}"] = distributed.full(state[slot])
    adam_steps = {name: float(optimizer.state[p]["step"]) for name, p in raw.items() if p in optimizer.state}
    if distributed.is_main():
        atomic_save(path, tensors, {"key": key, "step": str(step), "history": json.dumps(history), "adam_steps": json.dumps(adam_steps),
                                    **extra[1]})


def load_checkpoint(path: str, key: str, raw: Dict[str, torch.nn.Parameter], optimizer, selection=None):
    """(step, history) of a checkpoint for this exact training key, or None; the
    validation selection's state goes back into `selection`."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != key or "step" not in metadata:  # another job's, or only the lr probe's scores
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError):
        LOG.warning("dam: ignoring unreadable training checkpoint %s", path)
        return None
    adam_steps = json.loads(metadata["adam_steps"])
    with torch.no_grad():
        for name, p in raw.items():
            p.copy_(distributed.like(p, tensors[f"raw/{name}"]))
            if f"exp_avg/{name}" in tensors:
                optimizer.state[p] = {
                    "step": torch.tensor(adam_steps[name]),
                    "exp_avg": distributed.like(p, tensors[f"exp_avg/{name}"]),
                    "exp_avg_sq": distributed.like(p, tensors[f"exp_avg_sq/{name}"]),
                }
    if selection is not None and "selection" in metadata:
        selection.restore_state({name: distributed.like(raw[name[len("best/"):]], t) for name, t in tensors.items() if name.startswith("best/")},
                                metadata)
    return int(metadata["step"]), json.loads(metadata["history"])


class Checkpoints:
    """One run's checkpoints, as the loop's hooks: `begin` resumes from this key's
    checkpoint or measures step 0 (`measure()`, the linear average's held-out KL, which
    then travels in the history), `save` writes one, `remove` deletes it once the run ends."""

    def __init__(self, artifact_path: str, key: str, raw: Dict[str, torch.nn.Parameter], enabled: bool, steps: int, selection=None):
        self.path, self.key, self.raw, self.enabled, self.steps = sidecar(artifact_path, "checkpoint"), key, raw, enabled, steps
        self.selection = selection  # selection.KeepBest: its state travels in the checkpoint
        self.kl_start: Dict[str, float] = {}
        self.first_step = 0
        self.probe_state: Optional[dict] = None

    def begin(self, optimizer, measure):
        resumed = load_checkpoint(self.path, self.key, self.raw, optimizer, self.selection) if self.enabled else None
        if resumed:
            LOG.info("dam: resuming from %s at step %d of %d", self.path, resumed[0], self.steps)
            self.first_step, self.kl_start = resumed[0], resumed[1][0]["held_out_kl"]
        else:
            self.kl_start = measure()
        return resumed

    def probe(self) -> Optional[dict]:
        """What the `lr: auto` probe measured before this run stopped: {"scores": [[rate,
        validation KL or None (diverged)], ...], "tokens": n, "steps": steps per rate}, or None."""
        from safetensors import SafetensorError, safe_open

        if not self.enabled or not os.path.exists(self.path):
            return None
        try:
            with safe_open(self.path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError):
            return None
        return json.loads(metadata["lr_probe"]) if metadata.get("key") == self.key and "lr_probe" in metadata else None

    def save_probe(self, scores: Dict[float, float], tokens: int, steps: int) -> None:
        """Keep the probe's scores so far (a checkpoint with no training state yet)."""
        self.probe_state = {"scores": [[rate, score if math.isfinite(score) else None] for rate, score in scores.items()],
                            "tokens": tokens, "steps": steps}
        if self.enabled and distributed.is_main():
            try:
                atomic_save(self.path, {}, {"key": self.key, "lr_probe": json.dumps(self.probe_state)})
            except WriteError as error:
                LOG.warning("%s (the probe goes on without keeping its scores)", error)

    def save(self, step: int, optimizer, history: list) -> None:
        history[0]["held_out_kl"] = self.kl_start
        selection = self.selection.state() if self.selection else ({}, {})
        if self.probe_state is not None:  # a run resumed from here does not probe again
            selection = (selection[0], {**selection[1], "lr_probe": json.dumps(self.probe_state)})
        try:
            save_checkpoint(self.path, self.key, step, self.raw, optimizer, history, selection)
        except WriteError as error:  # training goes on; only resuming from here is lost
            LOG.warning("%s (training continues without this checkpoint)", error)

    def remove(self) -> None:
        if distributed.is_main() and os.path.exists(self.path):
            os.unlink(self.path)
