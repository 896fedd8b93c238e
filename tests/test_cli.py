"""`mergekit-dam`'s subcommands on paths that do not work: one line on stderr, exit 1."""

import pytest

from mergekit_dam.cli import main


@pytest.mark.parametrize("argv, fragment", [
    (["train", "{tmp}/nope.yml"], "config file {tmp}/nope.yml does not exist; check the path"),
    (["train", "{tmp}/bad.yml"], "{tmp}/bad.yml is not a readable YAML file"),
    (["train", "{tmp}/invalid.yml"], "{tmp}/invalid.yml is not a valid mergekit config (merge_method: Field required)"),
    (["inspect", "{tmp}/nope.safetensors"], "cannot read coefficients file {tmp}/nope.safetensors"),
    (["compare", "--lab", "{tmp}/nope", "{tmp}/model"], "cannot use {tmp}/nope/lab.json (No such file or directory); check the path"),
    (["lab", "build", "{tmp}/a-file/lab"], "cannot use {tmp}/a-file/lab"),
])
def test_a_path_that_does_not_work_is_one_line(tmp_path, capsys, argv, fragment):
    (tmp_path / "bad.yml").write_text("merge_method: dam\nmodels: [\n")
    (tmp_path / "invalid.yml").write_text("models:\n  - model: x\n")
    (tmp_path / "a-file").write_text("a file, not a folder")
    assert main(["-q", *[part.format(tmp=tmp_path) for part in argv]]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mergekit-dam error: "), error
    assert fragment.format(tmp=tmp_path) in error, error
