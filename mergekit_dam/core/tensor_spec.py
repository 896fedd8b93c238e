"""One tensor of a merge, as the plugin finds it in the inputs and the engine trains it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class TensorSpec:
    name: str  # mergekit's output tensor name (and the artifact's)
    shape: Tuple[int, ...]
    sources: Tuple[str, ...] = ()  # the name it has in each row's checkpoint (aliases, tied names)

    @property
    def coefficient_shape(self) -> Tuple[int, ...]:
        """One coefficient per input column (2-D) or per element (1-D); scalar tensors: one."""
        return (self.shape[-1],) if self.shape else (1,)
