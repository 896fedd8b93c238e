import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_dam.core.artifact import FORMAT, Artifact, open_artifact, write_artifact
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.tensor_spec import TensorSpec

MODELS = ["org/a", "org/b"]


def _coefficients():
    return {"w": torch.rand(2, 4), "norm": torch.rand(2, 4)}


def test_roundtrip_metadata_and_lazy_reads(tmp_path):
    path = tmp_path / "c.safetensors"
    coefficients = _coefficients()
    write_artifact(str(path), coefficients, MODELS, {"steps": 10, "loss": 0.5, "note": "x"})
    artifact = Artifact(str(path))
    assert artifact.metadata["format"] == FORMAT
    assert artifact.models == MODELS
    assert artifact.provenance("steps") == 10 and artifact.provenance("note") == "x"
    assert "mergekit" in json.loads(artifact.metadata["versions"])
    assert artifact.shapes == {"w": (2, 4), "norm": (2, 4)}
    torch.testing.assert_close(artifact.get("w"), coefficients["w"])
    # independent reader agrees
    torch.testing.assert_close(load_file(str(path))["norm"], coefficients["norm"])
    assert [p for p in os.listdir(tmp_path) if p != "c.safetensors"] == []




def test_rows_matched_by_name(tmp_path):
    path = tmp_path / "c.safetensors"
    write_artifact(str(path), _coefficients(), MODELS)
    artifact = Artifact(str(path))
    assert artifact.row_index(["org/b", "org/a"]) == [1, 0]
    with pytest.raises(DamError, match="was made for models"):
        artifact.row_index(["org/a", "org/c"])


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "c.safetensors"
    write_artifact(str(path), _coefficients(), MODELS)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_artifact(str(path), {"w": torch.rand(3, 4)}, MODELS)  # wrong row count
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: save_file({"w": torch.rand(2, 4)}, p, metadata={"format": "other/1"}), "not a mergekit-dam artifact"),
        (lambda p: save_file({"w": torch.rand(2, 4)}, p, metadata={"format": FORMAT}), "no valid `models`"),
        (lambda p: save_file({"w": torch.rand(3, 4)}, p, metadata={"format": FORMAT, "models": json.dumps(MODELS)}), "expected \\[2, D\\]"),
        (lambda p: save_file({"w": torch.rand(2, 4).half()}, p, metadata={"format": FORMAT, "models": json.dumps(MODELS)}), "non-float32"),
        (lambda p: open(p, "wb").write(b"\x00\x01garbage"), "not a readable safetensors"),
    ],
)
def test_bad_files_are_rejected_with_a_fix(tmp_path, corrupt, message):
    path = str(tmp_path / "c.safetensors")
    corrupt(path)
    with pytest.raises(DamError, match=message):
        Artifact(path)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "c.safetensors"
    write_artifact(str(path), _coefficients(), MODELS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(DamError, match="not a readable safetensors"):
        Artifact(str(path)).check(MODELS, [TensorSpec("w", (3, 4)), TensorSpec("norm", (4,))])


def test_check_reports_missing_wrong_shape_and_non_finite(tmp_path):
    path = str(tmp_path / "c.safetensors")
    coefficients = _coefficients()
    coefficients["norm"][1, 2] = float("nan")
    write_artifact(path, coefficients, MODELS)
    artifact = Artifact(path)
    with pytest.raises(DamError, match="no coefficients for tensor missing"):
        artifact.check(MODELS, [TensorSpec("missing", (4,))])
    with pytest.raises(DamError, match="expected \\[2, 5\\]"):
        artifact.check(MODELS, [TensorSpec("w", (3, 5))])
    with pytest.raises(DamError, match="NaN or Inf"):
        artifact.check(MODELS, [TensorSpec("norm", (4,))])


def test_open_artifact_rereads_a_rewritten_file(tmp_path):
    path = str(tmp_path / "c.safetensors")
    write_artifact(path, _coefficients(), MODELS)
    first = open_artifact(path)
    assert open_artifact(path) is first
    write_artifact(path, {"w": torch.rand(2, 8)}, MODELS)
    assert open_artifact(path).shapes == {"w": (2, 8)}


def test_written_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through a private temp file; the result must follow the umask like
    any file a teammate on a shared filesystem reads."""
    import stat

    from mergekit_dam.core.atomic import atomic_write_text

    previous = os.umask(0o022)
    try:
        write_artifact(str(tmp_path / "c.safetensors"), {"w": torch.ones(2, 3)}, ["a", "b"])
        atomic_write_text(str(tmp_path / "r.json"), "{}")
    finally:
        os.umask(previous)
    for name in ("c.safetensors", "r.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_the_files_beside_an_artifact_share_its_name_without_the_extension():
    from mergekit_dam.core.artifact import SIDECARS, sidecar

    assert sidecar("/w/coefficients.safetensors", "report") == "/w/coefficients.report.json"
    assert sidecar("/w/c.safetensors", "checkpoint") == "/w/c.ckpt"
    assert sidecar("/w/c", "validation_chart") == "/w/c.validation.png"
    assert set(SIDECARS) == {"report", "checkpoint", "validation_chart"}


def test_row_factors_make_a_format_2_file_that_keeps_its_complement(tmp_path):
    from mergekit_dam.core.artifact import FORMAT_ROWS, ROWS

    path = tmp_path / "c.safetensors"
    rows = torch.rand(2, 3)
    write_artifact(str(path), {**_coefficients(), "w" + ROWS: rows}, MODELS, rows_complement="org/a")
    artifact = Artifact(str(path))
    assert artifact.metadata["format"] == FORMAT_ROWS and artifact.rows_complement() == "org/a"
    torch.testing.assert_close(artifact.rows("w"), rows)
    assert artifact.rows("norm") is None
    artifact.check(MODELS, [TensorSpec("w", (3, 4)), TensorSpec("norm", (4,))])
    with pytest.raises(DamError, match="row factors for w have shape"):
        Artifact(str(path)).check(MODELS, [TensorSpec("w", (5, 4)), TensorSpec("norm", (4,))])
    with pytest.raises(ValueError, match="rows_complement"):
        write_artifact(str(tmp_path / "d.safetensors"), {"w" + ROWS: rows}, MODELS, rows_complement="org/z")
    # a columns-only artifact stays format 1, whatever rows_complement says
    write_artifact(str(tmp_path / "e.safetensors"), _coefficients(), MODELS, rows_complement="org/a")
    assert Artifact(str(tmp_path / "e.safetensors")).metadata["format"] == FORMAT
