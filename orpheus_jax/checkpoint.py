"""The run directory: Orbax checkpoints of the train state, the config and tokenizer as JSON, the
lock that keeps it to one run at a time, and loading a trained run for use (parameters only).

    <workdir>/config.json      the run's config, with vocab_size
    <workdir>/tokenizer.json   the character vocabulary
    <workdir>/metrics.jsonl    one JSON object per log or eval line
    <workdir>/events.out.tfevents.*   the same, for TensorBoard (one file per start)
    <workdir>/losses.png       the loss curves, redrawn at every evaluation
    <workdir>/lock             who is training in it (pid, host); held with flock while they do
    <workdir>/checkpoints/<step>/state   Orbax checkpoints (params, optimizer state, step, rng)
"""

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import re
import socket
import sys
import traceback

import jax

from orpheus_jax import OrpheusError, os_reason
from orpheus_jax import config as config_lib
from orpheus_jax.tokenizer import CharTokenizer


def _orbax():
    # Imported on first use: a sampler started from the user cache reads no checkpoint (sampler.py).
    import orbax.checkpoint as ocp

    return ocp


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer.json")


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl")


def plot_path(workdir: str) -> str:
    return os.path.join(workdir, "losses.png")


def complete_steps(directory: str) -> list[int]:
    """Steps whose save finished, read from disk: Orbax renames a save's tmp directory only then."""
    try:
        return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    except OSError:
        return []


def find_step(workdir: str, step: int | None = None) -> int:
    """The checkpoint step to use from a trained run (the latest when step is None), checked to exist."""
    if not os.path.isdir(workdir):
        raise OrpheusError(f"no such workdir: {workdir}")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise OrpheusError(
            f"no checkpoints in {workdir}: train first with python train.py --workdir {workdir}"
        )
    steps = complete_steps(directory)
    if not steps:
        raise OrpheusError(
            f"no checkpoint in {workdir}: train first with python train.py --workdir {workdir}"
        )
    if step is not None and step not in steps:
        raise OrpheusError(
            f"no checkpoint at step {step} in {directory} (have: {', '.join(map(str, steps))})"
        )
    return steps[-1] if step is None else step


def fingerprint(workdir: str, step: int) -> str:
    """What tells one run's checkpoint from any other: its path, config, vocabulary and every file's
    size and modification time (a run trained anew in the same workdir changes them)."""
    parts = [os.path.abspath(workdir), str(step)]
    for path in (config_path(workdir), tokenizer_path(workdir)):
        with open(path, "rb") as f:
            parts.append(f.read().decode("utf-8", "replace"))
    for root, dirs, files in sorted(
        os.walk(os.path.join(os.path.abspath(workdir), "checkpoints", str(step)))
    ):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            parts.append(
                f"{os.path.relpath(os.path.join(root, name), workdir)} {st.st_size} {st.st_mtime_ns}"
            )
    return "\n".join(parts)


class Checkpointer:
    """Async Orbax checkpoints of one run's train state."""

    def __init__(self, workdir: str, max_to_keep: int = 3, *, create: bool = True):
        directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if not create and not os.path.isdir(directory):
            raise OrpheusError(
                f"no checkpoints in {workdir}: train first with python train.py --workdir {workdir}"
            )
        # Only the training process (create=True, holding the workdir lock) may clear what a killed
        # save left behind: a reader doing it could delete a save in progress.
        ocp = _orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=True,
            create=create,
            cleanup_tmp_directories=create,
        )
        try:
            self._manager = ocp.CheckpointManager(directory, options=options)
        except Exception as e:  # a file where the directory should be, unreadable metadata, ...
            raise OrpheusError(f"cannot open checkpoints in {directory}: {_one_line(e)}") from None
        self.directory = directory
        self._saving = None  # the step of the save in flight, if any
        # A failed async save also logs its traceback from Orbax's thread; save/wait report it in one sentence.
        logging.getLogger("absl").addFilter(_drop_orbax_errors)
        _silence_orbax_background_failures()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def complete_steps(self) -> list[int]:
        return complete_steps(self.directory)

    def intact(self) -> str:
        """Which checkpoint a user can resume from, for error messages."""
        steps = [s for s in self.complete_steps() if s != self._saving]
        return (
            f"the last complete checkpoint, step {steps[-1]}, is intact"
            if steps
            else "no complete checkpoint exists yet"
        )

    def save(self, step: int, state) -> None:
        """Start an async save; it finishes in the background (see wait)."""
        if step in self._manager.all_steps():
            return  # already saved (e.g. a stop requested right after a periodic save)
        ocp = _orbax()
        try:  # a failure of the previous async save surfaces here too
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        except Exception as e:
            raise self._write_error(e) from None
        self._saving = step

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from None
        self._saving = None

    def _write_error(self, e: Exception) -> OrpheusError:
        step = f" {self._saving}" if self._saving is not None else ""
        return OrpheusError(
            f"cannot write checkpoint{step} in {self.directory}: {_os_reason(e)}; {self.intact()}"
        )

    def restore(self, step: int, abstract_state, *, partial: bool = False):
        """Restore onto the shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct).

        partial: `abstract_state` names only part of the saved state (a dict with some of its keys)."""
        if step not in self._manager.all_steps():
            raise OrpheusError(
                f"no checkpoint at step {step} in {self.directory} "
                f"(have: {', '.join(map(str, self.all_steps())) or 'none'})"
            )
        ocp = _orbax()
        if partial:
            args = ocp.args.PyTreeRestore(
                item=abstract_state,
                partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            )
        else:
            args = ocp.args.StandardRestore(abstract_state)
        try:
            with _quiet_stderr():
                restored = self._manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:  # truncated files, missing arrays, wrong shapes: not ours to fix
            raise OrpheusError(
                f"cannot restore checkpoint {os.path.join(self.directory, str(step))}: "
                f"{_one_line(e)} (move it aside to resume from an earlier one)"
            ) from None
        return restored["state"]

    def close(self) -> None:
        self._manager.close()
        logging.getLogger("absl").removeFilter(_drop_orbax_errors)


def _drop_orbax_errors(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


@contextlib.contextmanager
def _quiet_stderr():
    """Orbax/tensorstore print a traceback per array read that fails; the caller reports one line."""
    real_stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
    try:
        yield
    finally:  # put stderr back before closing the null file: Orbax's threads may report meanwhile
        quiet, sys.stderr = sys.stderr, real_stderr
        quiet.close()


def _silence_orbax_background_failures() -> None:
    """After a failed save or restore, Orbax's other writes and reads keep failing in the background,
    possibly before the main thread learns of the failure: tensorstore's callbacks into Orbax's closed
    event loop surface as unraisable RuntimeErrors, and its failed write tasks, garbage-collected, as
    asyncio's "Task exception was never retrieved". Each prints a bare traceback. So from the first
    Checkpointer on, drop those (and only those); the caller reports one line."""
    if getattr(sys.unraisablehook, "_orpheus", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook._orpheus = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_orbax_task_errors)


def _drop_orbax_task_errors(record: logging.LogRecord) -> bool:
    """asyncio names a task's coroutine, with its file, in the message; a bare future's failure shows
    where it came from only in its traceback."""
    if record.levelno < logging.ERROR:
        return True
    orbax = f"{os.sep}orbax{os.sep}"
    tb = record.exc_info[2] if record.exc_info else None
    files = [frame.filename for frame in traceback.extract_tb(tb)] if tb else []
    return not (orbax in record.getMessage() or any(orbax in f for f in files))


def abstract_like(tree, sharding):
    """The restore target for a tree of arrays: same shapes and dtypes, placed with `sharding` (one for
    every leaf, or a tree of them). Orbax reshards onto it from whatever topology saved the checkpoint."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


@dataclasses.dataclass
class TrainedRun:
    cfg: object  # the run's config (ml_collections.ConfigDict, with vocab_size)
    tokenizer: CharTokenizer
    params: dict
    step: int

    @property
    def model_cfg(self):
        from orpheus_jax.model import GPTConfig

        return GPTConfig.from_run_config(self.cfg, self.tokenizer.vocab_size)


def load_run(workdir: str, step: int | None = None, sharding=None) -> TrainedRun:
    """A trained run, from its workdir alone: config, tokenizer and parameters (no optimizer state).

    sharding: where the parameters go (default: replicated over all devices)."""
    from orpheus_jax.model import GPTConfig, init_params

    step = find_step(workdir, step)
    ckpt = Checkpointer(workdir, create=False)
    cfg = config_lib.load(config_path(workdir))
    tokenizer = CharTokenizer.load(tokenizer_path(workdir))
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    if sharding is None:
        from orpheus_jax.sharding import make_mesh, replicated

        sharding = replicated(make_mesh())
    shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    state = ckpt.restore(step, {"params": abstract_like(shapes, sharding)}, partial=True)
    ckpt.close()
    return TrainedRun(cfg, tokenizer, state["params"], step)


class WorkdirLock:
    """One training run per workdir at a time.

    An flock on <workdir>/lock, which the OS releases when the holder exits or is killed, so a hold
    left by a killed run is recognised (the file still names it, but nobody holds the lock) and taken
    over. The file says who holds it, for the error message of the run that is refused."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "lock")
        self.previous_holder = None  # a stale holder taken over, if any
        try:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a+")
        except OSError as e:
            raise OrpheusError(
                f"cannot use workdir {workdir}: {os_reason(e)}; its checkpoints are untouched"
            ) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read() or "holder unknown"
            self._file.close()
            raise OrpheusError(
                f"{workdir} is in use by another training run ({holder}); "
                "wait for it to finish, stop it, or use another --workdir"
            ) from None
        self.previous_holder = self._read() or None
        try:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(
                f"pid {os.getpid()} on {socket.gethostname()}, "
                f"since {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            )
            self._file.flush()
        except OSError:
            pass  # the lock itself holds; only the note for a refused run is missing (a full disk)

    def _read(self) -> str:
        self._file.seek(0)
        return self._file.read().strip()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self._file.seek(0)
            self._file.truncate()
        self._file.close()  # releases the flock


def _os_reason(e: Exception) -> str:
    """The operating system's reason inside an Orbax/tensorstore error, else its first line."""
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
        return os.strerror(int(code.group(1))).lower()
    if isinstance(e, OSError) and e.strerror:
        return os_reason(e)
    return _one_line(e)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
