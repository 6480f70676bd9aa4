"""Dropout bits from a counter hash: each element's bits are a hash of (its flat index in the whole array,
a two-word seed), so they are the same however the array is split over devices, and a kernel can
regenerate any block of them (pallas_attention.py) instead of storing a mask."""

import jax
import jax.numpy as jnp
from jax import lax

INDEX_MULTIPLIER = 0x9E3779B1  # spreads consecutive indices over the 32 bits before hashing


def hash_uint32(x):
    """murmur3's finalizer: a cheap, well-mixed 32-bit hash."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def index_bits(index, seed0, seed1):
    """The bits of the elements at these flat indices (uint32, wrapping)."""
    return hash_uint32(hash_uint32(index * jnp.uint32(INDEX_MULTIPLIER) ^ seed0) ^ seed1)


def hash_bits(shape, seed_2) -> jax.Array:
    """uint32 bits of an array of `shape`: sharding-invariant, like JAX's threefry."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index_bits(index, seed_2[0], seed_2[1])


def keep_threshold(rate: float) -> int:
    """Bits at or above this are kept: a fraction 1 - rate of them."""
    return round(rate * 2**32)
