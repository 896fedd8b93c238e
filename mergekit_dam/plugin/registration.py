"""Adding `merge_method: dam` to mergekit: the apply kernel (method.py) with the pre-merge
stage it runs (decision.py), and the guard around `run_merge` (preflight.py)."""

from __future__ import annotations

from mergekit.merge_methods import registry

from mergekit_dam.plugin import decision, preflight
from mergekit_dam.plugin.method import DamMerge


def register() -> None:
    """Add `dam` to mergekit's registry; calling it again is a no-op."""
    preflight.install()  # mergekit.merge already imported (no .pth hook): wrap run_merge now
    existing = {method.spec.name: method for method in registry.registered_methods()}
    if "dam" in existing:
        if type(existing["dam"]).__name__ != DamMerge.__name__:
            raise RuntimeError("another plugin already registered merge method 'dam'")
        return
    registry.register(DamMerge(prepare=decision.prepare))
