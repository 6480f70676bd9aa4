"""The kept samplers in the user cache: loaded without compiling, for every weight type; and a cache that
cannot be used (a file in its place, read-only, full, evicted under us, written by two processes at
once, or writable by others) costs start-up time and one warning line, never the sample."""

import glob
import os
import stat
import subprocess

import jax
import numpy as np
import pytest

from orpheus_jax import rundir, sampler_cache
from orpheus_jax.drafts import load_index
from orpheus_jax.sampler_cache import kept_sampler


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("ORPHEUS_CACHE", str(directory))
    monkeypatch.setattr(sampler_cache, "_warned", set())
    return directory


def count_compiles():
    compiles = []

    def listener(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles


def sample(workdir, step=None, weights="float32", batch_size=2, n=40, **settings):
    """40 new tokens (a refill included: the tiny run's block is 32) from a kept sampler."""
    sampler = kept_sampler(
        workdir, rundir.find_step(workdir, step), batch_size=batch_size, weights=weights, chunk=8, **settings
    )
    chunks = sampler.generate(np.array([1, 2, 3]), n, seed=5, rows=list(range(3, 3 + batch_size)))
    return sampler, np.concatenate(list(chunks), axis=1)


def warnings_of(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_a_kept_sampler_loads_without_compiling_and_decodes_the_same(tiny_run, cache, weights, capsys):
    _, expected = sample(tiny_run, weights=weights)
    compiles = count_compiles()
    loaded, got = sample(tiny_run, weights=weights)
    np.testing.assert_array_equal(got, expected)
    assert compiles == [] and loaded.model_cfg is None  # nothing traced or compiled: no model code ran
    (params_file,) = glob.glob(str(cache / "samplers" / "params" / "*.npz"))
    assert {np.load(params_file)[name].dtype.kind for name in np.load(params_file).files} >= {"f"}
    assert warnings_of(capsys) == []


def test_cache_folders_and_files_are_private(tiny_run, cache):
    sample(tiny_run)
    for path in [cache / "samplers", *glob.glob(str(cache / "samplers" / "*" / "**"), recursive=True)]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))


def test_a_damaged_program_is_built_again(tiny_run, cache, capsys):
    _, expected = sample(tiny_run)
    (decode,) = glob.glob(str(cache / "samplers" / "programs" / "*" / "decode.pickle"))
    with open(decode, "wb") as f:
        f.write(b"not a program")
    _, got = sample(tiny_run)
    np.testing.assert_array_equal(got, expected)
    (line,) = warnings_of(capsys)
    assert line.startswith("warning: cannot read the kept sampler program") and "rebuilding it" in line


def test_a_regular_file_as_the_cache_costs_one_warning(tiny_run, tmp_path, monkeypatch, capsys):
    expected = sample(tiny_run)[1]  # with a working cache (the session's)
    not_a_dir = tmp_path / "cache_file"
    not_a_dir.write_text("I am a file")
    monkeypatch.setenv("ORPHEUS_CACHE", str(not_a_dir))
    monkeypatch.setattr(sampler_cache, "_warned", set())
    capsys.readouterr()
    for _ in range(2):  # every later run samples too
        np.testing.assert_array_equal(sample(tiny_run)[1], expected)
        (line,) = warnings_of(capsys)
        assert line.startswith("warning: cannot keep the sampler in") and "not a directory" in line
        monkeypatch.setattr(sampler_cache, "_warned", set())


@pytest.mark.parametrize("trouble", ["read-only", "full"])
def test_an_unwritable_cache_costs_one_warning_and_leaves_no_temporary_files(
    tiny_run, small_filesystem, monkeypatch, capsys, trouble
):
    expected = sample(tiny_run)[1]
    monkeypatch.setenv("ORPHEUS_CACHE", small_filesystem)
    monkeypatch.setattr(sampler_cache, "_warned", set())
    if trouble == "read-only":
        assert subprocess.run(["mount", "-o", "remount,ro", small_filesystem]).returncode == 0
        reason = "read-only file system"
    else:
        with open(os.path.join(small_filesystem, "filler"), "wb") as f:  # leaves ~50 kB: less than a program
            free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
            f.write(b"\0" * (free - 50_000))
        reason = "no space left on device"
    capsys.readouterr()
    np.testing.assert_array_equal(sample(tiny_run)[1], expected)
    lines = warnings_of(capsys)
    assert len(lines) == 1 and lines[0].startswith("warning: cannot keep the sampler") and reason in lines[0]
    assert not glob.glob(os.path.join(small_filesystem, "**", "*.tmp"), recursive=True)


def test_a_group_writable_file_is_never_loaded(tiny_run, cache, capsys):
    _, expected = sample(tiny_run)
    (decode,) = glob.glob(str(cache / "samplers" / "programs" / "*" / "decode.pickle"))
    os.chmod(decode, 0o664)
    compiles = count_compiles()
    _, got = sample(tiny_run)
    np.testing.assert_array_equal(got, expected)
    assert compiles  # rebuilt, not loaded
    (line,) = warnings_of(capsys)
    assert line.startswith("warning: not loading the kept sampler") and "writable by group or others" in line
    assert stat.S_IMODE(os.stat(decode).st_mode) == 0o600  # written anew, private


def test_a_new_checkpoint_never_evicts_the_programs_it_uses(tiny_run, cache, capsys):
    """A parameters miss (another step of the same run) with the programs folder the oldest of more than
    KEEP: the eviction that follows must leave it, and the program compiled later lands in it."""
    steps = rundir.complete_steps(rundir.checkpoints_dir(tiny_run))
    drafts = dict(draft_len=4, draft_index=load_index(rundir.drafts_path(tiny_run)))
    sample(tiny_run, steps[-1], n=4, **drafts)  # prefill and decode kept (a first chunk); no speculate yet
    programs = cache / "samplers" / "programs"
    (ours,) = os.listdir(programs)
    os.utime(programs / ours, (1, 1))  # the oldest
    for i in range(sampler_cache.KEEP):
        (programs / f"other{i}").mkdir()
    _, got = sample(tiny_run, steps[0], **drafts)  # params miss; 40 tokens: speculate compiled and kept
    assert (programs / ours / "speculate.pickle").exists()
    assert len(os.listdir(programs)) == sampler_cache.KEEP
    assert warnings_of(capsys) == []
