"""The coefficient artifact: the contract between the training stage and the apply stage.

A safetensors file with, for every merged tensor, one float32 tensor of the same name
and shape [N, W.shape[-1]] (row i = effective coefficients of input model i), and
string metadata:
    format  = "mergekit-dam/1"
    models  = JSON list of input model references, in row order, as written in the config
    ...     = provenance (versions, settings, training summary), all JSON strings.
Format "mergekit-dam/2" (`granularity: row_column`) adds, for matrices that learn row
factors, a tensor `<name>:rows` [N, W.shape[0]], and `rows_complement`: the model whose
coefficient is 1 − Σ rᵢ ⊗ cᵢ (task vectors; JSON null for weights). Readers of /1 refuse /2
files, so a row-column artifact is never applied as columns only.
Written atomically (temp file + rename); read tensor by tensor through safetensors'
memory map, so a 70B merge never loads the whole file.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_dam.core.atomic import atomic_write
from mergekit_dam.core.errors import DamError

FORMAT = "mergekit-dam/1"
FORMAT_ROWS = "mergekit-dam/2"  # with row factors
ROWS = ":rows"  # `<tensor name>:rows`: that tensor's row factors [N, out]

# The files training writes beside an artifact, each named by one rule: the artifact's name
# with its extension replaced (`coefficients.safetensors` -> `coefficients.report.json`).
SIDECARS = {
    "report": ".report.json",  # the training report (job.TrainingReport), kept
    "checkpoint": ".ckpt",  # the training checkpoint, removed when the run ends
    "validation_chart": ".validation.png",  # the validation KL curve, kept
}


def sidecar(artifact_path: str, kind: str) -> str:
    """The path of the `kind` file (a key of SIDECARS) beside the artifact at `artifact_path`."""
    return os.path.splitext(artifact_path)[0] + SIDECARS[kind]


def versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    result = {}
    for package in ("mergekit-dam", "mergekit", "torch", "transformers", "safetensors"):
        try:
            result[package] = version(package)
        except PackageNotFoundError:
            result[package] = "unknown"
    return result


def write_artifact(
    path: str,
    coefficients: Mapping[str, torch.Tensor],
    models: Sequence[str],
    provenance: Optional[Mapping[str, Any]] = None,
    rows_complement: Optional[str] = None,
) -> None:
    """Write atomically: a reader sees either no file, the old file or the complete new one.
    Coefficients named `<tensor>:rows` make it a /2 file; `rows_complement` names the model
    whose row-column coefficient is the complement (task vectors)."""
    rows = len(models)
    tensors = {}
    for name, value in coefficients.items():
        if value.ndim != 2 or value.shape[0] != rows:
            raise ValueError(f"coefficients for {name} must have shape [{rows}, D]; got {list(value.shape)}")
        tensors[name] = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
    has_rows = any(name.endswith(ROWS) for name in tensors)
    metadata = {"format": FORMAT_ROWS if has_rows else FORMAT, "models": json.dumps(list(models)), "versions": json.dumps(versions())}
    if has_rows:
        if rows_complement is not None and rows_complement not in models:
            raise ValueError(f"rows_complement {rows_complement} is not among the models")
        metadata["rows_complement"] = json.dumps(rows_complement)
    for key, value in (provenance or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    atomic_save(path, tensors, metadata)


def atomic_save(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """A safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda temp_path: save_file(tensors, temp_path, metadata=dict(metadata)))


class Artifact:
    """An opened coefficient artifact. Opening reads only the header."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(path, framework="pt") as handle:
                self.metadata: Dict[str, str] = dict(handle.metadata() or {})
                self.shapes: Dict[str, Tuple[int, ...]] = {
                    name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()
                }
                dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise DamError(
                f"dam: coefficients file {path} is not a readable safetensors file ({error}); "
                "delete it to retrain, or point `coefficients` at a mergekit-dam artifact"
            ) from None
        if self.metadata.get("format") not in (FORMAT, FORMAT_ROWS):
            raise DamError(
                f"dam: {path} is not a mergekit-dam artifact (format {self.metadata.get('format')!r}, "
                f"expected {FORMAT!r} or {FORMAT_ROWS!r}); point `coefficients` at another path"
            )
        try:
            self.models: List[str] = json.loads(self.metadata["models"])
            assert isinstance(self.models, list) and all(isinstance(m, str) for m in self.models)
        except (KeyError, ValueError, AssertionError):
            raise DamError(f"dam: {path} has no valid `models` metadata; regenerate it") from None
        if len(set(self.models)) != len(self.models):
            raise DamError(f"dam: {path} lists a model twice in `models`; regenerate it")
        if dtypes - {"F32"}:
            raise DamError(f"dam: {path} holds non-float32 coefficients ({sorted(dtypes)}); regenerate it")
        bad_rows = [name for name, shape in self.shapes.items() if len(shape) != 2 or shape[0] != len(self.models)]
        if bad_rows:
            raise DamError(
                f"dam: {path} tensor {bad_rows[0]} has shape {list(self.shapes[bad_rows[0]])}, "
                f"expected [{len(self.models)}, D]; regenerate it"
            )

    def provenance(self, key: str) -> Any:
        value = self.metadata.get(key)
        try:
            return None if value is None else json.loads(value)
        except ValueError:
            return value

    def rows(self, name: str) -> Optional[torch.Tensor]:
        """Tensor `name`'s row factors [N, out] (format /2), or None: columns only."""
        return self.get(name + ROWS) if name + ROWS in self.shapes else None

    def rows_complement(self) -> Optional[str]:
        """The model whose row-column coefficient is 1 − Σ rᵢ ⊗ cᵢ (task vectors), or None."""
        return self.provenance("rows_complement")

    def get(self, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.shapes:
            raise DamError(f"dam: {self.path} has no coefficients for tensor {name}; regenerate it for this merge")
        with safe_open(self.path, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor if device is None else tensor.to(device)

    def row_index(self, models: Sequence[str]) -> List[int]:
        """Artifact row of each given model; rows are matched by name, never by position."""
        if sorted(models) != sorted(self.models):
            raise DamError(
                f"dam: {self.path} was made for models {self.models}, but this merge's inputs are "
                f"{list(models)}; retrain (`retrain: true`) or point `coefficients` at the right file"
            )
        return [self.models.index(model) for model in models]

    def check(self, models: Sequence[str], tensors: Sequence[Any]) -> None:
        """Everything the merge will need is present, shaped right and finite."""
        self.row_index(models)
        for spec in tensors:
            if spec.name not in self.shapes:
                raise DamError(
                    f"dam: {self.path} has no coefficients for tensor {spec.name}; "
                    "it was made for another architecture or model size; retrain or fix the path"
                )
            expected = (len(self.models), *spec.coefficient_shape)
            if self.shapes[spec.name] != expected:
                raise DamError(
                    f"dam: {self.path} coefficients for {spec.name} have shape {list(self.shapes[spec.name])}, "
                    f"expected {list(expected)} for this merge; retrain or fix the path"
                )
            if not torch.isfinite(self.get(spec.name)).all():
                raise DamError(f"dam: {self.path} coefficients for {spec.name} contain NaN or Inf; retrain")
            rows = self.rows(spec.name)
            if rows is not None and (len(spec.shape) != 2 or tuple(rows.shape) != (len(self.models), spec.shape[0])):
                raise DamError(
                    f"dam: {self.path} row factors for {spec.name} have shape {list(rows.shape)}, "
                    f"expected {[len(self.models), *spec.shape[:1]]} for this merge; retrain or fix the path"
                )
            if rows is not None and not torch.isfinite(rows).all():
                raise DamError(f"dam: {self.path} row factors for {spec.name} contain NaN or Inf; retrain")


_OPEN: Dict[Tuple[str, int, int, int], Artifact] = {}
_OPEN_LOCK = threading.Lock()


def open_artifact(path: str) -> Artifact:
    """Open once per file version (path, inode, mtime, size); safe from mergekit's worker threads."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DamError(f"dam: cannot read coefficients file {path} ({error.strerror}); check the path") from None
    key = (os.path.abspath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = Artifact(path)
        return _OPEN[key]
