"""Runs of several processes (one per host): joining one, which process speaks for it, agreeing to stop.

JAX's multi-controller runtime is the engine: every process runs the same program on its own devices,
and they meet in the collectives of every step. `jax.distributed.initialize` joins the processes
through a coordinator (process 0); its heartbeats end the run when a process dies: the others are
terminated by JAX ("... another task died") within `heartbeat_timeout_seconds`, or at once when the
coordinator is the one that died.
"""

import signal

import jax
import numpy as np

from orpheus_jax import OrpheusError
from orpheus_jax.sharding import batch_sharded, replicated


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    heartbeat_timeout_seconds: int = 100,
) -> None:
    """Join a multi-process run; must come before anything touches a device. Does nothing for a
    single process (no arguments and not `auto`).

    auto: JAX finds the coordinator and this process's place itself (TPU pod slices, SLURM, Open MPI,
    Kubernetes). With all three arguments given, nothing is detected."""
    given = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in given):
        return
    # Stopping is agreed by StopAgreement below; JAX's preemption service would take SIGTERM for itself.
    # (jax < 0.8 has no such option and always starts it; train.py's own SIGTERM handler, installed
    # later, takes the signal back.)
    if "jax_enable_preemption_service" in jax.config.values:
        jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            cluster_detection_method="deactivate" if None not in given else None,
        )
    except Exception as e:  # no coordinator within the timeout, a bad address, no cluster detected, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = (
            (
                "; --distributed works where JAX detects the cluster (TPU pod slices, SLURM, Open MPI, "
                "Kubernetes), elsewhere pass --coordinator_address, --num_processes and --process_id"
            )
            if auto
            else ""
        )
        raise OrpheusError(f"cannot join the multi-process run: {reason}{hint}") from None


def shutdown() -> None:
    """Leave the run: waits for the other processes to leave too, so none of them is cut off mid-save."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_main() -> bool:
    """Process 0 speaks for the run: it prints and writes the run directory's files (not the checkpoints,
    which every process writes its part of)."""
    return jax.process_index() == 0


class StopAgreement:
    """Stopping at the same step on every process.

    `request` is this process's stop request (a callable, true once a signal came, with `.signal` its
    name). With several processes, a request must reach all of them before any acts on it, or their
    collectives would diverge. So after each train call (and evaluation chunk) `poll` dispatches a tiny
    all-reduce of every process's request, and reads the answer of the previous poll, which is ready
    by the time the loop reads that call's metrics anyway: no wait on the device is added. Every process
    reads the same answers at the same polls, so all stop after the same call.

    With one process there is nothing to agree on: its own request is the answer, with no collective.
    It too is taken at polls only, so every decision between two polls sees one answer (read live, a
    signal landing between a call's save decision and the loop's next check ended the run unsaved)."""

    def __init__(self, request, mesh):
        self._request = request
        self._single = jax.process_count() == 1
        self._agreed = 0  # the largest signal number any process reported; 0: none
        self._pending = None
        if not self._single:
            n = mesh.devices.size
            flags = batch_sharded(mesh)
            # This process's signal number on each of its devices; made once per value, reused every poll.
            self._flags = lambda value: jax.make_array_from_callback(
                (n,), flags, lambda index: np.full(len(range(n)[index[0]]), value, np.int32)
            )
            self._cache = {}
            self._reduce = jax.jit(lambda per_device: per_device.max(), out_shardings=replicated(mesh))

    def poll(self) -> bool:
        """Share this process's request; true once any process's request has been agreed on."""
        value = signal.Signals[self._request.signal].value if self._request() else 0
        if self._single:
            self._agreed = max(self._agreed, value)
            return self()
        if value not in self._cache:
            self._cache[value] = self._flags(value)
        answer = self._reduce(self._cache[value])
        if self._pending is not None:
            self._agreed = max(self._agreed, int(self._pending))
        self._pending = answer
        return self()

    def __call__(self) -> bool:
        return self._agreed > 0

    @property
    def signal(self) -> str | None:
        """The signal that stopped the run (on whichever process received it)."""
        return signal.Signals(self._agreed).name if self._agreed else None
