"""mergekit-dam: Differentiable Adaptive Merging as a mergekit merge method.

Importing this package registers `merge_method: dam` with mergekit (idempotent), for
pipelines that use mergekit's Python API. `mergekit-yaml` needs no import: the
installed `mergekit_dam.pth` hook registers it whenever mergekit's methods load.
"""

from mergekit_dam.plugin.method import register

register()

from mergekit_dam.api import train  # noqa: E402
from mergekit_dam.plugin.artifact import FORMAT, Artifact, open_artifact, write_artifact  # noqa: E402
from mergekit_dam.plugin.config import DamError, DamSettings, ModelSettings  # noqa: E402

__all__ = [
    "FORMAT",
    "Artifact",
    "DamError",
    "DamSettings",
    "ModelSettings",
    "open_artifact",
    "register",
    "train",
    "write_artifact",
]
