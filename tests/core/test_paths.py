"""How user paths are read (core/paths.py)."""

import os

from mergekit_dam.core.paths import is_local, resolve_path


def test_paths_expand_the_home_and_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_path("data/a.jsonl") == os.path.join(str(tmp_path), "data", "a.jsonl")
    assert resolve_path("~/a.jsonl") == os.path.join(str(tmp_path), "home", "a.jsonl")


def test_a_dataset_is_local_when_it_exists_or_looks_like_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    assert is_local("folder")  # exists
    assert is_local("missing.jsonl") and is_local("./missing") and is_local("/abs/path") and is_local("~/x")
    assert not is_local("HuggingFaceH4/ultrachat_200k") and not is_local("gsm8k")


def test_a_dataset_path_that_is_not_a_readable_file_says_what_it_is(tmp_path, monkeypatch):
    from mergekit_dam.core.paths import dataset_file_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "ok.jsonl").write_text("{}\n")
    assert dataset_file_problem("ok.jsonl", "m") is None
    assert dataset_file_problem("gone.jsonl", "m") == "dam: dataset gone.jsonl (model m) does not exist; fix the path"
    assert dataset_file_problem("data", "m").startswith("dam: dataset data (model m) is a directory, not a file; give one of its")
    locked = tmp_path / "locked.jsonl"
    locked.write_text("{}\n")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # root reads anything
        assert "cannot be read (permission denied)" in dataset_file_problem("locked.jsonl", "m")
