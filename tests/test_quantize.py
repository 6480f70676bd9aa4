"""Weights for decoding: int8 quantization, the cast of a parameter tree, and the model's logits with them
against a NumPy reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from numpy_reference import numpy_forward

from orpheus_jax.model import GPTConfig, decoding_weights, forward, init_params
from orpheus_jax.quantize import quantize_int8

CFG = GPTConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda a: a * 4, init_params(CFG, jax.random.key(0)))


def dequantized(params):
    """Float64 NumPy weights from decoding_weights' output: each int8 kernel times its kernel_scale."""
    out = {}
    for name, value in params.items():
        if isinstance(value, dict):
            out[name] = dequantized(value)
        elif name == "kernel" and "kernel_scale" in params:
            out[name] = np.asarray(value, np.float64) * np.asarray(params["kernel_scale"], np.float64)
        elif name != "kernel_scale":
            out[name] = np.asarray(value, np.float64)
    return out


def int8_rows(x):
    """What an int8 product multiplies: x quantized per row (last axis), symmetric, 127 steps."""
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127
    return np.round(x / scale) * scale


@pytest.mark.parametrize("kernel_shape, n_in", [((32, 2, 16), 1), ((2, 16, 32), 2), ((32, 128), 1)])
def test_int8_quantization_round_trip(kernel_shape, n_in):
    kernel = np.random.default_rng(3).normal(0, 0.02, kernel_shape).astype(np.float32)
    kernel[..., 0] = 0  # an output channel of zeros (n_in = 2: a whole input row too)
    values, scale = (np.asarray(a) for a in quantize_int8(jnp.asarray(kernel), n_in))
    assert values.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == kernel_shape[n_in:]
    assert (np.abs(values * scale - kernel) <= scale / 2 + 1e-9).all()  # rounding: at most half a step
    peak = np.abs(values).max(axis=tuple(range(n_in)))
    assert (peak[kernel.reshape(-1, *kernel_shape[n_in:]).any(axis=0)] == 127).all()  # the full range is used
    assert np.isfinite(scale).all() and (values * scale == kernel)[..., 0].all()  # zeros stay exact


def test_cast_weights_keeps_all_but_the_kernels(params):
    for weights, dtype in (("bfloat16", jnp.bfloat16), ("int8", jnp.int8)):
        cast = decoding_weights(params, weights)
        flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(cast)[0]}
        kernels = [k for k in flat if k.endswith("['kernel']")]
        assert len(kernels) == 6 * CFG.n_layer + 1  # query, key, value, proj, fc, out per block; lm_head
        assert all(flat[k].dtype == dtype for k in kernels)
        others = [k for k in flat if k not in kernels and not k.endswith("['kernel_scale']")]
        assert others and all(flat[k].dtype == jnp.float32 for k in others)
        assert sum(k.endswith("['kernel_scale']") for k in flat) == (len(kernels) if weights == "int8" else 0)
    assert decoding_weights(params, "float32") is params


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_low_precision_logits_match_numpy_reference(params, weights):
    """The model with bf16/int8 kernels against NumPy in float64 with the same (dequantized) weights,
    multiplying what those products multiply: activations rounded to bf16, or quantized per row."""
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (3, CFG.block_size))
    cast = decoding_weights(params, weights)
    got = np.asarray(forward(CFG, cast, jnp.asarray(tokens)))
    to_bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)
    exact = numpy_forward(CFG, dequantized(cast), tokens, to_bf16 if weights == "bfloat16" else int8_rows)
    # Float32 and float64 round a few activations to the other neighbour (bf16 or int8 step): those
    # logits move by up to ~0.02. A 1% error in one kernel or its scale moves them all by ~0.01-0.02.
    error = np.abs(got - exact)
    assert error.mean() < 1e-3 and error.max() < 0.05
    # And the price of low precision against the float32 weights, for logits that span about +-4 here.
    float32 = numpy_forward(CFG, params, tokens)
    assert np.abs(got - float32).mean() < {"bfloat16": 0.05, "int8": 0.15}[weights]
    assert (got.argmax(-1) == float32.argmax(-1)).mean() > 0.9
