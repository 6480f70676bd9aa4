"""The run directory: where each file of a run lives, its JSON files, and the lock that keeps it to one
training run at a time. (The checkpoints themselves are Orbax's: checkpoint.py.)

    <workdir>/config.json      the run's config, with vocab_size
    <workdir>/tokenizer.json   the character vocabulary
    <workdir>/best.json        the step and validation loss of the best checkpoint
    <workdir>/metrics.jsonl    one JSON object per log or eval line
    <workdir>/events.out.tfevents.*   the same, for TensorBoard (one file per start)
    <workdir>/losses.png       the loss curves, redrawn at every evaluation
    <workdir>/drafts.npz       the training text's draft index for speculative sampling (drafts.py)
    <workdir>/lock             who is training in it (pid, host); held with flock while they do
    <workdir>/checkpoints/<step>/state   Orbax checkpoints (params, optimizer state, step, rng)
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket

from orpheus_jax import OrpheusError
from orpheus_jax.fileio import os_reason, write_atomically


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def tokenizer_path(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer.json")


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, "metrics.jsonl")


def plot_path(workdir: str) -> str:
    return os.path.join(workdir, "losses.png")


def drafts_path(workdir: str) -> str:
    return os.path.join(workdir, "drafts.npz")


def best_path(workdir: str) -> str:
    return os.path.join(workdir, "best.json")


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def complete_steps(directory: str) -> list[int]:
    """Steps whose save finished, read from disk: Orbax renames a save's tmp directory only then."""
    try:
        return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    except OSError:
        return []


def read_best(workdir: str) -> tuple[int, float] | None:
    """(step, validation loss) of the run's best checkpoint, or None if it has no record."""
    try:
        with open(best_path(workdir)) as f:
            record = json.load(f)
        return int(record["step"]), float(record["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_best(workdir: str, step: int, val_loss: float) -> None:
    write_atomically(best_path(workdir), json.dumps({"step": step, "val_loss": val_loss}))


def find_step(workdir: str, step: int | str | None = None) -> int:
    """The checkpoint step to use from a trained run, checked to exist: `step`, "best", or the latest
    (None)."""
    if not os.path.isdir(workdir):
        raise OrpheusError(f"no such workdir: {workdir}")
    directory = checkpoints_dir(workdir)
    steps = complete_steps(directory)
    if not steps:
        raise OrpheusError(
            f"no checkpoints in {workdir}: train first with python train.py --workdir {workdir}"
        )
    if step == "best":
        best = read_best(workdir)
        if best is None:
            raise OrpheusError(
                f"{workdir} has no best checkpoint recorded (runs record it at each evaluation)"
            )
        step = best[0]
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
    step_dir = os.path.join(checkpoints_dir(workdir), str(step))
    for root, _, files in sorted(os.walk(step_dir)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            parts.append(
                f"{os.path.relpath(os.path.join(root, name), workdir)} {st.st_size} {st.st_mtime_ns}"
            )
    return "\n".join(parts)


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
            since = datetime.datetime.now().isoformat(timespec="seconds")
            self._file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
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
