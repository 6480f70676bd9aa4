"""The kept samplers in the user cache: loaded without compiling, for every weight type; and a cache that
cannot be used (a file in its place, read-only, full, evicted under us, written by two processes at
once, or writable by others) costs start-up time and one warning line, never the sample.

Each use of the cache runs in a process of its own, as sample.py does: jaxlib 0.10 cannot run, in one
process, an executable it compiled beside the same one deserialized ("Function ... not found")."""

import glob
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from orpheus_jax import rundir, sampler_cache

pytestmark = pytest.mark.slow  # every test here starts processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = """
import json, sys
import jax
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        compiles.append(event) if event.endswith("backend_compile_duration") else None))
import numpy as np
from orpheus_jax import rundir
from orpheus_jax.drafts import load_index
from orpheus_jax.sampler_cache import kept_sampler
workdir, step, weights = sys.argv[1:4]
n, draft_len = int(sys.argv[4]), int(sys.argv[5])
index = load_index(rundir.drafts_path(workdir)) if draft_len else None
sampler = kept_sampler(workdir, rundir.find_step(workdir, int(step) if step != "latest" else None),
                       batch_size=2, weights=weights, chunk=8, draft_len=draft_len, draft_index=index)
tokens = np.concatenate(list(sampler.generate(np.array([1, 2, 3]), n, seed=5, rows=[3, 4])), axis=1)
print(json.dumps({"tokens": tokens.tolist(), "compiles": len(compiles),
                  "model_built": sampler.model_cfg is not None,
                  "flax": "flax" in sys.modules, "orbax": "orbax.checkpoint" in sys.modules}))
"""


def sample(workdir, cache, step="latest", weights="float32", n=40, draft_len=0):
    """40 new tokens (a refill included: the tiny run's block is 32) from a kept sampler, in a process
    of its own (speculative with draft_len > 0: the same tokens); returns (its report, its stderr lines)."""
    env = {**os.environ, "ORPHEUS_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", SAMPLE, workdir, str(step), weights, str(n), str(draft_len)], cwd=REPO,
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    return report, [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def expected(tiny_run):
    """The tokens a sampler that keeps nothing draws (in this process: nothing is deserialized here)."""
    from orpheus_jax.checkpoint import load_run
    from orpheus_jax.sampler import Sampler

    out = {}
    for step in ("latest", *rundir.complete_steps(rundir.checkpoints_dir(tiny_run))[:1]):
        run = load_run(tiny_run, None if step == "latest" else step)
        for weights in ("float32", "bfloat16", "int8"):
            sampler = Sampler(run.model_cfg, run.params, batch_size=2, chunk=8, weights=weights)
            chunks = sampler.generate(np.array([1, 2, 3]), 40, seed=5, rows=[3, 4])
            out[step, weights] = np.concatenate(list(chunks), axis=1).tolist()
    return out


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_a_kept_sampler_loads_without_compiling_flax_or_orbax(tiny_run, expected, tmp_path, weights):
    built, warnings = sample(tiny_run, tmp_path, weights=weights)
    assert built["tokens"] == expected["latest", weights] and built["compiles"] > 0 and warnings == []
    loaded, warnings = sample(tiny_run, tmp_path, weights=weights)
    assert loaded["tokens"] == expected["latest", weights] and warnings == []
    assert loaded["compiles"] == 0 and not loaded["model_built"]  # nothing traced or compiled
    assert not loaded["flax"] and not loaded["orbax"]
    # Every folder and file of the cache is private: a kept program is code that runs.
    for path in [tmp_path / "samplers", *glob.glob(str(tmp_path / "samplers" / "**"), recursive=True)]:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path


def test_a_damaged_program_is_built_again(tiny_run, expected, tmp_path):
    sample(tiny_run, tmp_path)
    (decode,) = glob.glob(str(tmp_path / "samplers" / "programs" / "*" / "decode.pickle"))
    with open(decode, "wb") as f:
        f.write(b"not a program")
    report, (line,) = sample(tiny_run, tmp_path)
    assert report["tokens"] == expected["latest", "float32"] and report["compiles"] > 0
    assert line.startswith("warning: cannot read the kept sampler program") and "rebuilding it" in line
    assert sample(tiny_run, tmp_path)[0]["compiles"] == 0  # and kept again


def test_damaged_settings_are_written_again(tiny_run, expected, tmp_path):
    sample(tiny_run, tmp_path, draft_len=2)
    (settings,) = glob.glob(str(tmp_path / "samplers" / "programs" / "*" / "settings.json"))
    with open(settings, "w") as f:
        f.write("[1, 2]")  # JSON, but no settings
    report, (line,) = sample(tiny_run, tmp_path, draft_len=2)
    assert report["tokens"] == expected["latest", "float32"] and report["model_built"]
    assert line.startswith("warning: cannot read the kept sampler (") and "holds no settings" in line
    report, warnings = sample(tiny_run, tmp_path, draft_len=2)
    assert warnings == [] and not report["model_built"] and report["compiles"] == 0


def test_weights_that_do_not_fit_the_kept_programs_are_kept_again(tiny_run, expected, tmp_path):
    sample(tiny_run, tmp_path)
    (params,) = glob.glob(str(tmp_path / "samplers" / "params" / "*"))
    os.remove(os.path.join(params, sorted(os.listdir(params))[0]))  # one array gone
    report, (line,) = sample(tiny_run, tmp_path)
    assert report["tokens"] == expected["latest", "float32"]
    assert line.startswith("warning: the kept weights in") and "do not fit the kept programs" in line
    assert sample(tiny_run, tmp_path)[1] == []  # kept whole again


def test_a_regular_file_as_the_cache_costs_one_warning(tiny_run, expected, tmp_path):
    not_a_dir = tmp_path / "cache_file"
    not_a_dir.write_text("I am a file")
    for _ in range(2):  # every later run samples too
        report, (line,) = sample(tiny_run, not_a_dir)
        assert report["tokens"] == expected["latest", "float32"]
        assert line.startswith("warning: cannot keep the sampler in") and "not a directory" in line


@pytest.mark.parametrize("trouble", ["read-only", "full"])
def test_an_unwritable_cache_costs_one_warning_and_leaves_no_temporary_files(
    tiny_run, expected, small_filesystem, trouble
):
    if trouble == "read-only":
        assert subprocess.run(["mount", "-o", "remount,ro", small_filesystem]).returncode == 0
        reason = "read-only file system"
    else:
        with open(os.path.join(small_filesystem, "filler"), "wb") as f:  # leaves ~50 kB: less than a program
            free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
            f.write(b"\0" * (free - 50_000))
        reason = "no space left on device"
    report, lines = sample(tiny_run, small_filesystem)
    assert report["tokens"] == expected["latest", "float32"]
    assert len(lines) == 1 and lines[0].startswith("warning: cannot keep the sampler") and reason in lines[0]
    assert not glob.glob(os.path.join(small_filesystem, "**", "*.tmp"), recursive=True)


def test_a_group_writable_file_is_never_loaded(tiny_run, expected, tmp_path):
    sample(tiny_run, tmp_path)
    (decode,) = glob.glob(str(tmp_path / "samplers" / "programs" / "*" / "decode.pickle"))
    os.chmod(decode, 0o664)
    report, (line,) = sample(tiny_run, tmp_path)
    assert report["tokens"] == expected["latest", "float32"] and report["compiles"] > 0  # rebuilt, not loaded
    assert line.startswith("warning: not loading the kept sampler") and "writable by group or others" in line
    assert stat.S_IMODE(os.stat(decode).st_mode) == 0o600  # written anew, private


def test_a_new_checkpoint_never_evicts_the_programs_it_uses(tiny_run, expected, tmp_path):
    """A parameters miss (another step of the same run) with the programs folder the oldest of more than
    KEEP: the eviction that follows must leave it, and the program compiled later lands in it."""
    sample(tiny_run, tmp_path, n=4, draft_len=4)  # prefill and decode kept (a first chunk); no speculate yet
    programs = tmp_path / "samplers" / "programs"
    (ours,) = os.listdir(programs)
    os.utime(programs / ours, (1, 1))  # the oldest
    for i in range(sampler_cache.KEEP):
        (programs / f"other{i}").mkdir(mode=0o700)
    first_step = rundir.complete_steps(rundir.checkpoints_dir(tiny_run))[0]
    report, warnings = sample(tiny_run, tmp_path, step=first_step, draft_len=4)  # params miss: speculate kept
    assert report["tokens"] == expected[first_step, "float32"] and warnings == []
    assert (programs / ours / "speculate.pickle").exists()
    assert len(os.listdir(programs)) == sampler_cache.KEEP


def test_two_processes_building_the_same_sampler_at_once_both_sample(tiny_run, expected, tmp_path):
    env = {**os.environ, "ORPHEUS_CACHE": str(tmp_path)}
    args = [sys.executable, "-c", SAMPLE, tiny_run, "latest", "float32", "40", "0"]
    procs = [
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ]
    procs.append(
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and err.strip() == "", err
        assert json.loads(out.splitlines()[-1])["tokens"] == expected["latest", "float32"]
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)
    assert sample(tiny_run, tmp_path)[0]["compiles"] == 0
