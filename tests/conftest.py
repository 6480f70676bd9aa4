"""Every test process sees 8 simulated CPU devices, so sharded code paths run everywhere."""

import os
import subprocess
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pytest

from orpheus_jax import host_memory
from orpheus_jax.user_cache import compilation_cache_dir, enable_compilation_cache

host_memory.keep_freed_memory()  # as the command lines do: XLA:CPU's scratch buffers reused

# Tests compile the same small programs again and again (every train() of configs/tiny.py): JAX's
# persistent cache, under $ORPHEUS_CACHE as for train.py (CI gives the run a fresh one), shares them
# between tests, pytest-xdist workers and the processes the slow tests start, also those given an
# $ORPHEUS_CACHE of their own (through JAX's variable, which train.py honours). A test of the cache
# itself sets JAX_COMPILATION_CACHE_DIR="" for its process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", compilation_cache_dir())
enable_compilation_cache()


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request, monkeypatch):
    """The fast tier (`-m "not slow"`) stays fast: a test that starts a process must be marked slow."""
    if request.node.get_closest_marker("slow") is None:

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(scope="session")
def iliad_path() -> str:
    """The seed's corpus, from $ORPHEUS_DATA or ../shared/data (never a copy in the repo)."""
    path = os.environ.get("ORPHEUS_DATA") or os.path.join(REPO, "..", "shared", "data", "iliad.txt")
    if not os.path.exists(path):
        pytest.fail(f"corpus not found at {path}: set ORPHEUS_DATA to the Iliad text")
    return path


@pytest.fixture(scope="session")
def small_text_path(iliad_path, tmp_path_factory) -> str:
    """The first 60,000 characters of the Iliad, for quick runs."""
    path = tmp_path_factory.mktemp("data") / "iliad_head.txt"
    with open(iliad_path, encoding="utf-8") as f:
        path.write_text(f.read(60_000), encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_cfg():
    from configs import tiny

    return tiny.get_config()


@pytest.fixture(scope="session")
def tiny_run(small_text_path, tmp_path_factory) -> str:
    """A run directory of configs/tiny.py (in-process), for tests that need a trained run: 100 steps
    at a high rate, 10 per call, so that its text has words in it (a few seconds more than 20)."""
    from configs import tiny
    from orpheus_jax.train import train

    cfg = tiny.get_config()
    cfg.update(
        max_iters=100,
        learning_rate=1e-2,
        min_lr=1e-3,
        steps_per_call=10,
        eval_interval=50,
        checkpoint_interval=50,
        log_interval=50,
    )
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    train(cfg, workdir, small_text_path)
    return workdir


def _read_events(directory):
    """({tag: [(step, value)]} of scalars, {tag: [(step, text)]} of texts) in a directory's TensorBoard
    event files, read by the accumulator TensorBoard's server uses (it applies restarts' purges)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    acc.Reload()
    scalars, texts = {}, {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        values = [(e.step, make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
        if plugin == "scalars":
            scalars[tag] = [(step, float(v)) for step, v in values]
        elif plugin == "text":
            texts[tag] = [(step, v.reshape(-1)[0].decode()) for step, v in values]
    return scalars, texts


@pytest.fixture
def read_events():
    return _read_events


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MB tmpfs, to fill up or turn read-only. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)])
