"""The one store of the pre-merge stage's decisions in this process.

mergekit 0.1.5 gives a merge method no planning hook and no view of the whole config, so
the stage decides once per merge (decision.py) and the kernel calls, the Python API and
the model card look the decision up here: by the planner that asked (the API), by what a
kernel call can see (its settings and input names), and in the order they were made (the
card). It also remembers which artifacts this process trained, by training key.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_dam.core.paths import resolve_path


@dataclass(frozen=True)
class CoefficientSource:
    """Where one merge's coefficients come from: an artifact, or equal weights 1/N."""

    rows: Tuple[str, ...]
    artifact_path: Optional[str]  # None = equal coefficients


class PreparedMerges:
    def __init__(self):
        self.lock = threading.RLock()  # one merge's stage at a time; mergekit's worker threads read
        self._by_planner: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._by_kernel: Dict[Tuple[str, Tuple[str, ...]], CoefficientSource] = {}
        self.in_order: List[CoefficientSource] = []
        self.trained: Dict[str, str] = {}  # training key -> the artifact this process wrote for it

    @staticmethod
    def _kernel_key(settings, rows: Sequence[str]) -> Tuple[str, Tuple[str, ...]]:
        return settings.model_dump_json(), tuple(sorted(rows))

    def add(self, planner, settings, source: CoefficientSource) -> None:
        """The decision for one merge: `settings` as its kernel calls will see them
        (parametrization concrete); `planner`: mergekit's, or None."""
        with self.lock:
            if planner is not None:
                self._by_planner[planner] = source
            self._by_kernel[self._kernel_key(settings, source.rows)] = source
            self.in_order.append(source)

    def of(self, planner) -> Optional[CoefficientSource]:
        with self.lock:
            return self._by_planner.get(planner)

    def for_kernel(self, settings, rows: Sequence[str]) -> CoefficientSource:
        """The coefficient source a kernel call should use: prepared in mergekit runs; for
        direct Python API calls (`merge_state_dicts`, `merge_tensors`) it follows the
        `coefficients` setting."""
        with self.lock:
            prepared = self._by_kernel.get(self._kernel_key(settings, rows))
        if prepared is not None:
            return prepared
        return CoefficientSource(tuple(rows), resolve_path(settings.coefficients) if settings.coefficients else None)


PREPARED = PreparedMerges()
