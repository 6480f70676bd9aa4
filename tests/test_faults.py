"""Faults that must not lose work, through train.py as a user runs it: divergence, two runs on one
workdir, a run killed with -9, a disk that fills up or turns read-only."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from script_runner import REPO, assert_one_line_error, run
from test_cli import TINY, trained  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # every test here starts a process (see pyproject.toml)


def strict_records(workdir):
    """metrics.jsonl read as strict JSON: NaN/Infinity tokens are refused."""

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def checkpoints(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def start(*args):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_step(workdir, beyond, proc, timeout=120):
    """Block until metrics.jsonl logs a step > beyond (the run is training); return that step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            steps = [
                r["step"] for r in map(json.loads, open(path).read().splitlines()[:-1] or []) if "loss" in r
            ]
            if steps and max(steps) > beyond:
                return max(steps)
        time.sleep(0.05)
    raise AssertionError("the run did not get going")


def test_divergence_stops_at_once_and_keeps_the_good_checkpoints(trained, small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    args = [*TINY, "--workdir", workdir, "--data", small_text_path]
    assert checkpoints(workdir) == [10, 20]

    result = run(
        "train.py",
        *args,
        "--config.max_iters=100",
        "--config.learning_rate=1e6",
        "--config.grad_clip=0",
        "--config.lr_decay_iters=100",  # else the resumed run keeps its decayed schedule
        "--config.keep_checkpoints=2",  # a save would rotate step 10 out
    )
    assert_one_line_error(
        result, "training diverged at step", "the last checkpoint, step 20, is good", "--config.learning_rate"
    )
    assert "Done" not in result.stdout
    assert checkpoints(workdir) == [10, 20]  # nothing saved from a non-finite state, nothing rotated out
    strict_records(workdir)

    # The good checkpoint restores, and training resumes from it with a sane learning rate.
    resumed = run("train.py", *args, "--config.max_iters=30")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 20" in resumed.stdout and checkpoints(workdir)[-1] == 30
    losses = [r["loss"] for r in strict_records(workdir) if "loss" in r]
    assert all(isinstance(x, float) for x in losses)


def test_a_second_run_on_a_busy_workdir_is_refused(small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        *TINY,
        "--workdir",
        workdir,
        "--data",
        small_text_path,
        "--config.max_iters=1000000",
        "--config.eval_interval=1000000",
        "--config.checkpoint_interval=1000000",
    ]
    first = start(*args)
    try:
        wait_for_step(workdir, 0, first)
        second = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.n_embd=64")
        assert_one_line_error(second, "is in use by another training run", f"pid {first.pid} on")
        assert first.poll() is None  # the first run goes on, unharmed
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err
    step = int(out.split("Stopped by SIGINT at step ")[1].split(";")[0])
    assert checkpoints(workdir) == [step]
    assert json.load(open(os.path.join(workdir, "config.json")))["n_embd"] == 32


def test_a_hold_left_by_a_killed_run_is_taken_over(small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    killed = start(*TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=1000000")
    wait_for_step(workdir, 0, killed)
    killed.kill()
    killed.wait()
    assert f"pid {killed.pid} on" in open(os.path.join(workdir, "lock")).read()  # the stale hold
    result = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path)
    assert result.returncode == 0, result.stderr
    assert f"from a run that is no longer running (pid {killed.pid} on" in result.stdout
    assert open(os.path.join(workdir, "lock")).read() == ""  # released at the end


def test_kill_9_at_random_moments_then_resume_logs_each_step_once(small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        *TINY,
        "--workdir",
        workdir,
        "--data",
        small_text_path,
        "--config.max_iters=60",
        "--config.log_interval=1",
        "--config.eval_interval=10",
        "--config.checkpoint_interval=10",
    ]
    rng = random.Random(0)
    last = 0
    for _ in range(2):
        proc = start(*args)
        try:
            last = wait_for_step(workdir, last, proc)
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            proc.kill()
            proc.wait()
        if proc.returncode == 0:  # it finished before the kill
            break
    result = run("train.py", *args)
    assert result.returncode == 0, result.stderr
    records = strict_records(workdir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 61))
    assert [r["step"] for r in records if "val_loss" in r] == list(range(0, 61, 10))
    assert checkpoints(workdir)[-1] == 60
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if not d.isdigit()]


def test_a_full_disk_ends_in_one_sentence(trained, small_text_path, small_filesystem):
    workdir = os.path.join(small_filesystem, "run")
    shutil.copytree(trained[0], workdir)
    with open(os.path.join(small_filesystem, "filler"), "wb") as f:  # leave ~100 kB: less than a checkpoint
        free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
        f.write(b"\0" * (free - 100_000))
    result = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=30")
    assert_one_line_error(
        result,
        "cannot write checkpoint 30",
        "no space left on device",
        "the last complete checkpoint, step 20, is intact",
    )
    assert checkpoints(workdir) == [10, 20]


def test_a_read_only_workdir_ends_in_one_sentence(trained, small_text_path, small_filesystem):
    workdir = os.path.join(small_filesystem, "run")
    shutil.copytree(trained[0], workdir, ignore=lambda d, names: ["20"] if d.endswith("checkpoints") else [])
    assert subprocess.run(["mount", "-o", "remount,ro", small_filesystem]).returncode == 0
    result = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=30")
    assert_one_line_error(
        result, "cannot use workdir", "read-only file system", "its checkpoints are untouched"
    )
    assert checkpoints(workdir) == [10]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_an_unwritable_workdir_ends_in_one_sentence(trained, small_text_path, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    os.chmod(os.path.join(workdir, "metrics.jsonl"), 0o444)
    result = run("train.py", *TINY, "--workdir", workdir, "--data", small_text_path, "--config.max_iters=30")
    assert_one_line_error(
        result,
        "cannot write",
        "metrics.jsonl",
        "permission denied",
        "the last complete checkpoint, step 20, is intact",
    )
