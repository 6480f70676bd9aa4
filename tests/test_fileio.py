"""Atomic writes: readers never see half a file, failures leave nothing behind, and writers of the
same file at the same moment (processes sharing a cache) all succeed."""

import multiprocessing
import os

import pytest

from orpheus_jax import WriteError
from orpheus_jax.fileio import atomic_file, write_atomically


def _write_many(path, barrier, tag, rounds):
    barrier.wait()
    for i in range(rounds):
        with atomic_file(path, "wb") as f:
            f.write(f"{tag} {i}\n".encode() * 1000)


def test_two_processes_writing_the_same_file_at_once_both_succeed(tmp_path):
    path = str(tmp_path / "entry")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    writers = [context.Process(target=_write_many, args=(path, barrier, tag, 50)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    content = open(path).read().splitlines()
    assert len(set(content)) == 1 and content[0] in ("a 49", "b 49")  # one whole file, the last one
    assert os.listdir(tmp_path) == ["entry"]  # no temporary files left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "entry"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(str(path), "w") as f:
        f.write("half of the new")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["entry"]


def test_file_mode_and_write_errors(tmp_path):
    with atomic_file(str(tmp_path / "private"), "w", file_mode=0o600) as f:
        f.write("x")
    assert os.stat(tmp_path / "private").st_mode & 0o777 == 0o600
    with pytest.raises(WriteError, match=r"cannot write .*missing/config.json: no such file or directory"):
        write_atomically(str(tmp_path / "missing" / "config.json"), "{}")
