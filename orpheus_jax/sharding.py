"""The device mesh: one `data` axis over all devices (of every process); batches split on it.

Parameters and optimizer state are either replicated on every device, or sharded over the same axis
(FSDP, after google-deepmind/nanodo): each matrix is split along a dimension the device count divides,
and gathered whole for the forward and backward pass of a step (train.make_train_step), so the
gradient is summed back onto the same shards (a reduce-scatter; XLA:CPU all-reduces, then slices).
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from orpheus_jax import OrpheusError

# Smaller arrays (and every vector: biases, LayerNorm scales) stay replicated under FSDP: splitting
# them saves little memory and costs a collective each.
FSDP_MIN_SIZE = 1024


def make_mesh(devices=None) -> Mesh:
    # Auto axes (classic GSPMD): make_mesh defaults to Explicit, which breaks embedding lookups
    # on a batch-sharded token array.
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split over the devices along `batch_axis` (e.g. 2 for windows of shape (steps, micro, B, W))."""
    return NamedSharding(mesh, P(*[None] * batch_axis, "data"))


def fsdp_spec(shape: tuple, n_devices: int) -> P:
    """Shard the largest dimension that n_devices divides; replicate vectors, small and indivisible arrays."""
    if len(shape) < 2 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % n_devices == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: shape[i])
    return P(*["data" if i == axis else None for i in range(len(shape))])


def state_shardings(abstract_tree, mesh: Mesh, param_sharding: str):
    """A sharding for every leaf of a tree of arrays (or jax.ShapeDtypeStructs): parameters and
    optimizer state alike, since Adam's moments have the shapes of the parameters they follow."""
    if param_sharding == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), abstract_tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.devices.size)), abstract_tree)


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise OrpheusError(
            f"batch_size ({batch_size}) must be divisible by the number of devices ({n}); "
            f"try --config.batch_size={max(n, batch_size // n * n)}"
        )
