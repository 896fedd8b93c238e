"""mergekit-dam: Differentiable Adaptive Merging as a mergekit merge method.

Importing this package registers `merge_method: dam` with mergekit (idempotent), for
pipelines that use mergekit's Python API. `mergekit-yaml` needs no import: the
installed `mergekit_dam.pth` hook registers it whenever mergekit's methods load.

The public API: `train` (the pre-merge stage without merging), the settings, the error
type, and the coefficient artifact (its format, reader, writer and the files beside it).
"""

from mergekit_dam.plugin.registration import register

register()

from mergekit_dam.api import train  # noqa: E402
from mergekit_dam.core.artifact import FORMAT, Artifact, open_artifact, sidecar, write_artifact  # noqa: E402
from mergekit_dam.core.errors import DamError  # noqa: E402
from mergekit_dam.core.settings import DamSettings, ModelSettings  # noqa: E402

__all__ = [
    "FORMAT",
    "Artifact",
    "DamError",
    "DamSettings",
    "ModelSettings",
    "open_artifact",
    "register",
    "sidecar",
    "train",
    "write_artifact",
]
