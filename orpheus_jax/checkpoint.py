"""Orbax checkpoints of the train state: asynchronous saves, which ones are kept (the last K and the
best), restoring onto any mesh, and loading a trained run for use (its parameters only).

Orbax reports failures loudly (tracebacks from its threads, asyncio's unretrieved task errors); the
callers here report one sentence instead, so the end of this module quiets exactly those reports.
"""

import contextlib
import dataclasses
import logging
import os
import re
import sys
import traceback

import jax

from orpheus_jax import OrpheusError, rundir
from orpheus_jax import config as config_lib
from orpheus_jax.fileio import os_reason
from orpheus_jax.tokenizer import CharTokenizer


def _orbax():
    # Imported on first use: a sampler started from the user cache reads no checkpoint (sampler_cache.py).
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    """Async Orbax checkpoints of one run's train state, keeping the last `keep` and the best.

    The best is the checkpoint with the lowest validation loss passed to `save`. It counts as kept
    once its save has finished (the next save or `wait` tells); until then the previous best is kept
    too, so a crash during its save loses neither. Every process of a run makes the same decisions
    (the losses are global), so deletions happen in step on all of them; only the one with
    `writes_record` writes <workdir>/best.json."""

    def __init__(self, workdir: str, keep: int = 3, *, create: bool = True, writes_record: bool = False):
        directory = rundir.checkpoints_dir(workdir)
        if not create and not os.path.isdir(directory):
            raise OrpheusError(
                f"no checkpoints in {workdir}: train first with python train.py --workdir {workdir}"
            )
        # Only the training process (create=True, holding the workdir lock) may clear what a killed
        # save left behind: a reader doing it could delete a save in progress.
        ocp = _orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=True, create=create, cleanup_tmp_directories=create
        )
        try:
            self._manager = ocp.CheckpointManager(directory, options=options)
        except Exception as e:  # a file where the directory should be, unreadable metadata, ...
            raise OrpheusError(f"cannot open checkpoints in {directory}: {_one_line(e)}") from None
        self.directory, self._workdir, self._keep, self._writes_record = (
            directory,
            workdir,
            keep,
            writes_record,
        )
        self._saving = None  # the step of the save in flight, if any
        best = rundir.read_best(workdir)
        self.best = best if best and best[0] in self._manager.all_steps() else None  # (step, val_loss)
        self._candidate = None  # a better (step, val_loss) whose save is in flight
        # A failed async save also logs its traceback from Orbax's thread; save/wait report it in one
        # sentence.
        logging.getLogger("absl").addFilter(_drop_orbax_errors)
        _silence_orbax_background_failures()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def complete_steps(self) -> list[int]:
        return rundir.complete_steps(self.directory)

    def best_so_far(self) -> tuple[int, float] | None:
        return self._candidate or self.best

    def improves(self, val_loss: float) -> bool:
        best = self.best_so_far()
        return best is None or val_loss < best[1]

    def intact(self) -> str:
        """Which checkpoint a user can resume from, for error messages."""
        steps = [s for s in self.complete_steps() if s != self._saving]
        return (
            f"the last complete checkpoint, step {steps[-1]}, is intact"
            if steps
            else "no complete checkpoint exists yet"
        )

    def save(self, step: int, state, val_loss: float | None = None) -> None:
        """Start an async save (it finishes in the background, see wait); val_loss: the evaluation of
        this step, if there was one, which may make it the best."""
        if step not in self._manager.all_steps():
            ocp = _orbax()
            try:  # waits for the previous save first; its failure surfaces here too
                self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
            except Exception as e:
                raise self._write_error(e) from None
            self._finished()
            self._saving = step
        if val_loss is not None and self.improves(val_loss):
            self._candidate = (step, val_loss)
        self._prune()

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from None
        self._finished()
        self._saving = None
        self._prune()

    def _finished(self) -> None:
        """Every save started before now has finished: a candidate best becomes the best."""
        if self._candidate and self._candidate[0] != self._saving:
            self._candidate, self.best = None, self._candidate
        elif self._candidate and self._saving is not None:
            self._candidate, self.best = None, self._candidate
        else:
            return
        if self._writes_record:
            rundir.write_best(self._workdir, *self.best)

    def _prune(self) -> None:
        steps = sorted(self._manager.all_steps())
        kept = set(steps[-self._keep :])
        kept |= {record[0] for record in (self.best, self._candidate) if record}
        for step in steps:
            if step not in kept:
                try:
                    self._manager.delete(step)
                except Exception as e:
                    raise OrpheusError(
                        f"cannot delete checkpoint {step} in {self.directory}: {_os_reason(e)}"
                    ) from None

    def _write_error(self, e: Exception) -> OrpheusError:
        step = f" {self._saving}" if self._saving is not None else ""
        return OrpheusError(
            f"cannot write checkpoint{step} in {self.directory}: {_os_reason(e)}; {self.intact()}"
        )

    def restore(self, step: int, abstract_state, *, partial: bool = False):
        """Restore onto the shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct).

        partial: `abstract_state` names only part of the saved state (a dict with some of its keys)."""
        if step not in self._manager.all_steps():
            have = ", ".join(map(str, self.all_steps())) or "none"
            raise OrpheusError(f"no checkpoint at step {step} in {self.directory} (have: {have})")
        ocp = _orbax()
        if partial:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            args = ocp.args.PyTreeRestore(
                item=abstract_state, partial_restore=True, restore_args=restore_args
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
    params: dict  # the weights to use: the averaged ones when the run keeps an average (ema_decay > 0)
    step: int

    @property
    def model_cfg(self):
        from orpheus_jax.model import GPTConfig

        return GPTConfig.from_run_config(self.cfg, self.tokenizer.vocab_size)


def load_run(workdir: str, step: int | str | None = None, sharding=None) -> TrainedRun:
    """A trained run, from its workdir alone: config, tokenizer and the weights to use (no optimizer state).

    step: a step, "best", or None for the latest. sharding: where the parameters go (default: replicated
    over all devices)."""
    from orpheus_jax.model import GPTConfig, init_params

    step = rundir.find_step(workdir, step)
    ckpt = Checkpointer(workdir, create=False)
    cfg = config_lib.load(rundir.config_path(workdir))
    tokenizer = CharTokenizer.load(rundir.tokenizer_path(workdir))
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    if sharding is None:
        from orpheus_jax.sharding import make_mesh, replicated

        sharding = replicated(make_mesh())
    shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    name = "ema" if cfg.ema_decay > 0 else "params"
    state = ckpt.restore(step, {name: abstract_like(shapes, sharding)}, partial=True)
    ckpt.close()
    return TrainedRun(cfg, tokenizer, state[name], step)


def _drop_orbax_errors(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and _in_orbax(record.pathname))


def _in_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename


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
    Checkpointer on, drop those that come from Orbax (and only those); the caller reports one line.
    tensorstore calls the loop from native code: its unraisable error has no object and no Python
    caller, its traceback starts in asyncio's call_soon_threadsafe."""
    if getattr(sys.unraisablehook, "_orpheus", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        frames = traceback.extract_tb(unraisable.exc_traceback)
        from_native = unraisable.object is None and frames and frames[0].name == "call_soon_threadsafe"
        from_orbax = from_native or any(_in_orbax(frame.filename) for frame in frames)
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and from_orbax):
            previous(unraisable)

    hook._orpheus = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_orbax_task_errors)


def _drop_orbax_task_errors(record: logging.LogRecord) -> bool:
    """asyncio names a task's coroutine, with its file, in the message; a bare future's failure shows
    where it came from only in its traceback."""
    if record.levelno < logging.ERROR:
        return True
    tb = record.exc_info[2] if record.exc_info else None
    files = [frame.filename for frame in traceback.extract_tb(tb)] if tb else []
    return not (_in_orbax(record.getMessage()) or any(map(_in_orbax, files)))


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
