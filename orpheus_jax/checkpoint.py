"""The run directory: Orbax checkpoints of the train state, plus the config and tokenizer as JSON.

    <workdir>/config.json      the run's config, with vocab_size
    <workdir>/tokenizer.json   the character vocabulary
    <workdir>/metrics.jsonl    one JSON object per log or eval line
    <workdir>/checkpoints/<step>/state   Orbax checkpoints (params, optimizer state, step, rng)
"""
import os
import sys

import jax
import orbax.checkpoint as ocp

from orpheus_jax import OrpheusError


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer.json")


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl")


class Checkpointer:
    """Async Orbax checkpoints of one run's train state."""

    def __init__(self, workdir: str, max_to_keep: int = 3, *, create: bool = True):
        directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if not create and not os.path.isdir(directory):
            raise OrpheusError(f"no checkpoints in {workdir}: train first with python train.py --workdir {workdir}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=True,
                                               create=create)
        try:
            self._manager = ocp.CheckpointManager(directory, options=options)
        except Exception as e:  # a file where the directory should be, unreadable metadata, ...
            raise OrpheusError(f"cannot open checkpoints in {directory}: {_one_line(e)}") from None
        self.directory = directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state) -> None:
        """Start an async save; it finishes in the background (see wait)."""
        if step in self._manager.all_steps():
            return  # already saved (e.g. a stop requested right after a periodic save)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

    def restore(self, step: int, abstract_state):
        """Restore onto the shardings of `abstract_state` (a pytree of jax.ShapeDtypeStruct)."""
        if step not in self._manager.all_steps():
            raise OrpheusError(f"no checkpoint at step {step} in {self.directory} "
                               f"(have: {', '.join(map(str, self.all_steps())) or 'none'})")
        real_stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            sys.stderr = real_stderr
        except Exception as e:  # truncated files, missing arrays, wrong shapes: not ours to fix
            # stderr stays silenced: the failed restore's other reads keep finishing in the
            # background, each printing a traceback into Orbax's closed event loop.
            raise OrpheusError(f"cannot restore checkpoint {os.path.join(self.directory, str(step))}: "
                               f"{_one_line(e)} (move it aside to resume from an earlier one)") from None
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree, sharding):
    """The restore target for a tree of arrays: same shapes and dtypes, placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
