"""Low-precision weights for decoding: bfloat16, or int8 with a float32 scale per output channel, and
the int8 product the model runs with them (activations quantized per row).

Only Dense kernels are cast; embeddings, LayerNorm and biases stay float32 (about 1% of the seed
model's bytes, and the embeddings are looked up, not multiplied).
"""

import jax.numpy as jnp
from jax import lax

WEIGHTS = ("float32", "bfloat16", "int8")


def quantize_int8(kernel, n_in: int):
    """(int8 values, float32 scale per output): symmetric, the scale the largest |weight| over the
    kernel's n_in input axes / 127, so kernel ~= values * scale."""
    scale = jnp.max(jnp.abs(kernel), axis=tuple(range(n_in))) / 127
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero output channel
    return jnp.round(kernel / scale).astype(jnp.int8), scale.astype(jnp.float32)


def quantize_rows(x, n_in: int):
    """int8 values and float32 scales of activations x, symmetric, per row over its last n_in axes."""
    axes = tuple(range(x.ndim - n_in, x.ndim))
    scale = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True), 1e-30) / 127
    return jnp.round(x / scale).astype(jnp.int8), scale


def int8_product(x, kernel_q, kernel_scale, dims, n_in: int, out_dtype):
    """x @ kernel for an int8 kernel with its per-output scale: x quantized per row, an int32 product,
    both scales applied to the result."""
    x_q, x_scale = quantize_rows(x, n_in)
    acc = lax.dot_general(x_q, kernel_q, dims, preferred_element_type=jnp.int32)
    x_scale = x_scale.reshape(x_scale.shape[: x.ndim - n_in] + (1,) * kernel_scale.ndim)
    return (acc.astype(jnp.float32) * x_scale * kernel_scale).astype(out_dtype)


def cast_weights(params, weights: str, input_axes):
    """The Dense kernels in the `weights` type ("float32": unchanged; "bfloat16"; "int8", each kernel
    beside its "kernel_scale"). input_axes(names) -> how many leading axes of the kernel at that params
    path are its input axes (model.dense_input_axes)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")

    def cast(tree, names):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = cast(value, names + (name,))
            elif name != "kernel":
                out[name] = value
            elif weights == "bfloat16":
                out[name] = value.astype(jnp.bfloat16)
            else:
                out[name], out["kernel_scale"] = quantize_int8(value, input_axes(names + (name,)))
        return out

    return params if weights == "float32" else cast(params, ())
