import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_runner import REPO

from orpheus_jax import OrpheusError
from orpheus_jax.checkpoint import load_run
from orpheus_jax.rundir import WorkdirLock
from orpheus_jax.train import train


@pytest.fixture(scope="module")
def run_dir(small_text_path, tmp_path_factory):
    from configs import tiny

    workdir = str(tmp_path_factory.mktemp("ckpt") / "run")
    state = train(tiny.get_config(), workdir, small_text_path)
    return workdir, jax.tree.map(np.asarray, state.params)


@pytest.mark.slow
def test_load_run_gives_the_trained_parameters(run_dir):
    workdir, params = run_dir
    run = load_run(workdir)
    assert run.step == 20 and run.tokenizer.vocab_size == run.cfg.vocab_size
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, run.params))
    assert load_run(workdir, step=10).step == 10


@pytest.mark.slow
def test_a_failed_restore_leaves_stderr_working(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir[0], workdir)
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "20")):
        for name in files:
            if os.path.basename(root) == "d":
                open(os.path.join(root, name), "wb").close()
    stderr = sys.stderr
    with pytest.raises(OrpheusError, match="cannot restore checkpoint"):
        load_run(workdir)
    assert sys.stderr is stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("still heard", stacklevel=1)
    assert [str(w.message) for w in caught] == ["still heard"]


# What a failed async save leaves behind: a write task and a future, failed in a module at argv[1], whose
# failures nobody retrieves, and a callback into Orbax's event loop after it closed.
_BACKGROUND_FAILURE = """
import asyncio, gc, sys, types
from orpheus_jax.checkpoint import Checkpointer
Checkpointer(sys.argv[2]).close()
namespace = {}
exec(compile("def fail():\\n    raise OSError(28, 'No space left on device')\\n"
             "async def write():\\n    fail()\\n"
             "def call_back(loop):\\n    loop.call_soon_threadsafe(print)\\n", sys.argv[1], "exec"),
     namespace)
loop = asyncio.new_event_loop()
task = loop.create_task(namespace["write"]())
loop.run_until_complete(asyncio.sleep(0))
future = loop.create_future()
try:
    namespace["fail"]()
except OSError as e:
    future.set_exception(e)
loop.close()
class LateCallback:
    def __del__(self):
        namespace["call_back"](loop)
LateCallback()
del task, future
gc.collect()
try:  # tensorstore's callback: native code calls the closed loop, no Python frame above asyncio's
    loop.call_soon_threadsafe(print)
except RuntimeError as e:
    sys.unraisablehook(types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__.tb_next, err_msg=None, object=None))
class OtherFailure:
    def __del__(self):
        raise ValueError("not ours to hide")
OtherFailure()
"""


@pytest.mark.slow
@pytest.mark.parametrize("package", ["orbax", "other"])
def test_orbax_failures_left_in_the_background_print_nothing_else(package, tmp_path):
    module = os.path.join(os.sep, "venv", package, "checkpoint", "serialization.py")
    result = subprocess.run(
        [sys.executable, "-c", _BACKGROUND_FAILURE, module, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # another library's: reported (once: the native caller's is dropped for both)
    assert result.stderr.count("RuntimeError: Event loop is closed") == (package == "other")
    assert ("Task exception was never retrieved" in result.stderr) == (package == "other")
    assert ("Future exception was never retrieved" in result.stderr) == (package == "other")
    assert "ValueError: not ours to hide" in result.stderr


def test_one_run_holds_a_workdir_at_a_time(tmp_path):
    first = WorkdirLock(str(tmp_path))
    with pytest.raises(OrpheusError, match=rf"in use by another training run \(pid {os.getpid()} on "):
        WorkdirLock(str(tmp_path))
    first.release()
    second = WorkdirLock(str(tmp_path))  # released: free again, and not reported as stale
    assert second.previous_holder is None
    second.release()


def tiny_state(value: float):
    return {"w": jnp.full((4, 3), value), "step": jnp.int32(value)}


def kept(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_the_last_k_and_the_best_are_kept(tmp_path):
    """keep=2: the last two saves, and the one with the lowest validation loss however old; a save's
    record becomes the best only once it has finished (here: at the next save or wait)."""
    from orpheus_jax.checkpoint import Checkpointer
    from orpheus_jax.rundir import read_best

    workdir = str(tmp_path)
    ckpt = Checkpointer(workdir, keep=2, writes_record=True)
    for step, val in [(1, 3.0), (2, 2.0), (3, None), (4, 2.5), (5, None), (6, 1.5), (7, None)]:
        ckpt.save(step, tiny_state(step), val)
        ckpt.wait()
    assert kept(workdir) == [6, 7] and read_best(workdir) == (6, 1.5)
    ckpt.close()
    ckpt = Checkpointer(workdir, keep=1, writes_record=True)  # a resumed run keeps the record
    assert ckpt.best == (6, 1.5) and ckpt.improves(1.4) and not ckpt.improves(1.6)
    ckpt.save(8, tiny_state(8), 1.6)
    ckpt.wait()
    assert kept(workdir) == [6, 8]
    ckpt.close()


def test_a_best_whose_save_did_not_finish_does_not_replace_the_record(tmp_path):
    from orpheus_jax.checkpoint import Checkpointer
    from orpheus_jax.rundir import read_best

    workdir = str(tmp_path)
    ckpt = Checkpointer(workdir, keep=1, writes_record=True)
    ckpt.save(1, tiny_state(1), 2.0)
    ckpt.wait()
    ckpt.save(2, tiny_state(2), 1.0)  # in flight: step 1 is still the best on disk, and kept
    assert read_best(workdir) == (1, 2.0) and ckpt.best_so_far() == (2, 1.0)
    assert 1 in ckpt.all_steps()
    ckpt.wait()
    assert read_best(workdir) == (2, 1.0) and kept(workdir) == [2]
    ckpt.close()
    os.remove(os.path.join(workdir, "best.json"))  # a record lost with a crash: none is invented
    assert Checkpointer(workdir, keep=1).best is None
