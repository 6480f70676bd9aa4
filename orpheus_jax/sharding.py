"""The device mesh: one `data` axis over all devices; batches split on it, parameters replicated."""
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from orpheus_jax import OrpheusError


def make_mesh(devices=None) -> Mesh:
    # Auto axes (classic GSPMD): make_mesh defaults to Explicit, which breaks embedding lookups
    # on a batch-sharded token array.
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise OrpheusError(f"batch_size ({batch_size}) must be divisible by the number of devices ({n}); "
                           f"try --config.batch_size={max(n, batch_size // n * n)}")
