"""orpheus_jax.pallas_attention against the model's own attention (attention.attend_block over all keys, with
the hash dropout of model.hash_bits), forward and gradients, in interpret mode on CPU; its CUDA lowering
(Triton custom calls) without a GPU; and, where there is a GPU, the compiled Triton kernels."""

import contextlib
import functools
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orpheus_jax import attention, model
from orpheus_jax.pallas_attention import flash_attention

SEED = np.array([0x12345678, 0x9ABCDEF0], np.uint32)


def reference(q_NTK, k_NTK, v_NTK, seed_2, scale, rate, dtype="float32"):
    """The model's training attention (CausalSelfAttention with kv=None), float32 by default: one
    attend_block over all keys, dropout mask hash_bits((N, T, T), seed) >= round(rate * 2**32)."""
    N, T, K = q_NTK.shape
    pos_T = jnp.arange(T)
    start = (jnp.full((N, T), -jnp.inf), jnp.zeros((N, T)), jnp.zeros((N, T, K)))
    drop = lambda p: p
    if rate > 0:
        keep_NTS = model.hash_bits((N, T, T), seed_2) >= jnp.uint32(round(rate * 2**32))
        drop = lambda p: jnp.where(keep_NTS, p / (1.0 - rate), 0).astype(p.dtype)
    m_NT, l_NT, o_NTK = attention.attend_block(q_NTK, k_NTK, v_NTK, pos_T, pos_T, scale, dtype, start, drop)
    return (o_NTK / l_NT[..., None]).astype(dtype)


def _inputs(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    # Scores of a few units, so that the softmax is far from uniform and a wrong mask or scale shows.
    return [(2 * jax.random.normal(key, shape)).astype(dtype) for key in keys]


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_vjp(attend, q, k, v, do, seed, offset):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seed, offset), q, k, v)
    return out, vjp(do)


def _check(dtype, rate, N_total, n_offset, N, T, K, block_q, block_k, atol, rtol, interpret=True):
    """Kernel on rows n_offset.. of N_total against the reference on all N_total rows, sliced: outputs and
    the gradients of a random cotangent. bfloat16 inputs are compared with the float32 reference of the
    same (rounded) inputs."""
    q, k, v, do = _inputs((N_total, T, K), dtype)
    scale = K**-0.5
    rows = slice(n_offset, n_offset + N)

    def kernel(q, k, v, seed, offset):
        return flash_attention(
            q, k, v, seed, scale=scale, dropout_rate=rate, n_offset=offset, block_q=block_q,
            block_k=block_k, interpret=interpret,
        )  # fmt: skip

    def ref(q, k, v, seed, offset):
        return jax.lax.dynamic_slice_in_dim(reference(q, k, v, seed, scale, rate), offset, N)

    # Forward and vjp in one program each (interpret mode's time is mostly compiling); seed and offset
    # traced, as in a train step.
    f32 = lambda x: x.astype(jnp.float32)
    out, grads = _forward_and_vjp(kernel, q[rows], k[rows], v[rows], do[rows], SEED, n_offset)
    assert out.dtype == dtype and out.shape == (N, T, K)
    ref_out, ref_grads = _forward_and_vjp(ref, f32(q), f32(k), f32(v), f32(do)[rows], SEED, n_offset)
    ref_grads = [g[rows] for g in ref_grads]
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads]):
        assert got.dtype == dtype, name
        got, want = np.asarray(f32(got)), np.asarray(want)
        label = f"{jnp.dtype(dtype).name} rate {rate} T {T} K {K} {name}"
        print(f"{label}: max error / max {np.abs(got - want).max() / np.abs(want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=atol * np.abs(want).max(), rtol=rtol, err_msg=label)


@pytest.mark.parametrize(
    "dtype, rate, N_total, n_offset, N, T, K, block_q, block_k",
    [
        # 4 query blocks x 2 key blocks: blocks past the diagonal skipped, the diagonal one masked.
        (jnp.float32, 0.0, 2, 0, 2, 128, 32, 32, 64),
        # dropout, rows 2..3 of 4 (n_offset), key blocks smaller than query blocks
        (jnp.float32, 0.2, 4, 2, 2, 128, 32, 64, 32),
        # blocks larger than T: one block of 32
        (jnp.float32, 0.2, 1, 0, 1, 32, 16, 64, 64),
        (jnp.bfloat16, 0.2, 3, 1, 2, 64, 16, 32, 16),
    ],
)
def test_matches_model_attention_forward_and_gradients(
    dtype, rate, N_total, n_offset, N, T, K, block_q, block_k
):
    # float32: ~1e-6 of the largest value seen; bfloat16 inputs: bf16 weights and outputs (~2**-8 relative).
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
    _check(dtype, rate, N_total, n_offset, N, T, K, block_q, block_k, **tol)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_kept_fraction_is_one_minus_rate(rate):
    # q = k = 0: every causal weight is 1/(t+1); v = 1: out[n, t] = kept(n, t) / ((1 - rate) * (t + 1)).
    N, T, K = 4, 128, 16
    zeros, ones = jnp.zeros((N, T, K)), jnp.ones((N, T, K))
    out = flash_attention(zeros, zeros, ones, jnp.asarray(SEED), scale=1.0, dropout_rate=rate, interpret=True)
    kept_NT = np.asarray(out[:, :, 0]) * (1 - rate) * np.arange(1, T + 1)
    np.testing.assert_allclose(kept_NT, np.round(kept_NT), atol=1e-3)  # whole weights kept or dropped
    fraction = np.round(kept_NT).sum() / (N * T * (T + 1) / 2)  # 33,024 causal weights: sd 0.0028 at 0.5
    assert abs(fraction - (1 - rate)) < 0.012, fraction
    assert np.all(np.asarray(out[:, :, 1:]) == np.asarray(out[:, :, :1]))


def test_rejects_blocks_triton_cannot_tile():
    x = jnp.zeros((1, 64, 16))
    with pytest.raises(ValueError, match="block_q"):
        flash_attention(x, x, x, SEED, scale=1.0, block_q=24, interpret=True)
    with pytest.raises(ValueError, match="head size"):
        flash_attention(*(jnp.zeros((1, 64, 24)),) * 3, SEED, scale=1.0, interpret=True)


def _cuda_target():
    """jax >= 0.11 looks up the GPU's compute capability when lowering for Triton and, with no GPU,
    needs an abstract one (AbstractDevice with a platform); 0.7.2 and 0.10.2 fall back to sm_90 without."""
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    if "platform" not in inspect.signature(jax.sharding.AbstractDevice).parameters:
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_to_triton_for_cuda(dtype):
    """Lowering runs Pallas' Triton lowering rules in Python (compiling the Triton IR needs the GPU)."""

    def loss(q, k, v, seed, offset):
        out = flash_attention(q, k, v, seed, scale=0.125, dropout_rate=0.2, n_offset=offset)
        return out.astype(jnp.float32).sum()

    x = jax.ShapeDtypeStruct((4, 128, 64), dtype)
    args = (x, x, x, jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.int32))
    with _cuda_target():
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
        text = text.as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    # forward, D = rowsum(dO * O), dK/dV, dQ: all Triton, none Mosaic GPU (0.10.x's default without params)
    assert sum("xla.gpu.triton" in line for line in calls) == 4, calls
    assert not any("mosaic" in line for line in calls), calls


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: runs the kernels compiled by Triton")
def test_compiled_kernels_on_gpu():
    # Pallas' Triton dots take float32 as TF32 (as XLA's default GPU precision); the reference here is
    # float32 at full precision, hence the looser float32 tolerance.
    cases = [
        (jnp.float32, 0.2, 11, 3, 8, 256, 64, 64, 64, 1e-2, 1e-2),
        (jnp.bfloat16, 0.2, 11, 3, 8, 256, 64, 64, 64, 2e-2, 2e-2),
        (jnp.float32, 0.0, 2, 0, 2, 64, 16, 32, 16, 1e-2, 1e-2),
    ]
    for dtype, rate, N_total, n_offset, N, T, K, block_q, block_k, atol, rtol in cases:
        with jax.default_matmul_precision("highest"):
            _check(dtype, rate, N_total, n_offset, N, T, K, block_q, block_k, atol, rtol, interpret=False)
    # Time of a forward + backward at the seed config (batch 64 x 6 heads, T 256, K 64), for the record.
    q, k, v, do = _inputs((384, 256, 64), jnp.bfloat16)
    for name, attend in [
        (
            "pallas",
            lambda q, k, v: flash_attention(q, k, v, jnp.asarray(SEED), scale=0.125, dropout_rate=0.2),
        ),
        ("xla", lambda q, k, v: reference(q, k, v, jnp.asarray(SEED), 0.125, 0.2, "bfloat16")),
    ]:
        step = jax.jit(lambda q, k, v, do, attend=attend: jax.vjp(attend, q, k, v)[1](do))
        jax.block_until_ready(step(q, k, v, do))
        start = time.perf_counter()
        for _ in range(10):
            out = step(q, k, v, do)
        jax.block_until_ready(out)
        print(f"{name}: forward + backward {(time.perf_counter() - start) / 10 * 1e3:.3f} ms")
