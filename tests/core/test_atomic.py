"""Atomic writes (core/atomic.py): the new file or the old one, never a torn one, and what
killed writers leave behind is removed by the next write."""

import os
import subprocess
import sys

import pytest

from mergekit_dam.core.atomic import WriteError, atomic_write, atomic_write_text, remove_orphans


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(str(path), "old")
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]


def test_a_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(str(path), "old")

    def half_then_fail(temp_path):
        with open(temp_path, "w") as handle:
            handle.write("ne")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(str(path), half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_no_space_is_one_line_naming_the_file(tmp_path):
    def full(temp_path):
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*out.json: No space left on device; free space there"):
        atomic_write(str(tmp_path / "out.json"), full)


def test_leftovers_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(dead.stdout)
    (tmp_path / f".dam-{gone}-abc.tmp").mkdir()
    (tmp_path / f".dam-partial-{gone}-xyz").mkdir()
    (tmp_path / f".dam-{os.getpid()}-mine.tmp").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    remove_orphans(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([f".dam-{os.getpid()}-mine.tmp", "keep.txt"])
