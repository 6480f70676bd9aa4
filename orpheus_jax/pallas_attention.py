"""Flash-style causal attention in Pallas (Triton on GPU, interpret mode on CPU), forward and backward, with
the model's counter-hash attention dropout regenerated per block, so no T x T mask or matrix is stored.

    out_NTK = flash_attention(q_NTK, k_NTK, v_NTK, seed_2, scale=..., dropout_rate=..., n_offset=...)

equals the model's attention (`attention.attend_block` over all keys, hash Dropout) for the same seed:
with p_NTS = exp(scores - row max), the weights are where(keep, p / (1 - rate), 0) over the sum of the
undropped p, keep[n, t, s] = hash_bits((N, T, T), seed_2)[n + n_offset, t, s] >= round(rate * 2**32).

Kernels (grid (N, blocks), each program one block of rows, a fori_loop over the causal blocks):
- forward: per query block, the running max / sum / output over key blocks 0 .. its diagonal; writes the
  output and the logsumexp (N, T), the only residual besides q, k, v and the output;
- backward: D = rowsum(dO * O) per query block; dK, dV per key block, looping over the query blocks from
  the diagonal on; dQ per query block, looping over key blocks up to the diagonal. Each recomputes
  P = exp(q k^T * scale - lse) and the keep mask of its block from the hash.

Shape suffixes as in model.py: N attention batch (batch * heads), T query positions, S key positions,
K head size; in kernels Q and C are a query block's and a key block's rows.

Pallas versions (0.7.2 on Colab, 0.10.2, 0.11.2): BlockSpec(block_shape, index_map) and
`interpret=True` behave the same in the three. What differs is the default GPU lowering: jax 0.10.x
lowers a pallas_call without compiler params to Mosaic GPU (flag jax_pallas_use_mosaic_gpu, default on),
0.7.2 and 0.11.x to Triton; every call here passes Triton's CompilerParams, which selects Triton in all.
jax 0.11.2 warns that the Pallas Triton backend is deprecated (Mosaic GPU is its successor).

Precision: float32 dots take the default precision of the trace (on GPU TF32, as XLA's own matmuls;
`jax.default_matmul_precision("highest")` around the call gives full float32). With bfloat16 inputs the
dropped weights are rounded to bfloat16 once, after the 1 / (1 - rate) scaling; the model rounds before
it, a difference of one bfloat16 rounding.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from orpheus_jax.hashing import index_bits, keep_threshold


def _keep_QC(params_ref, n, first_t, first_s, shape, T: int, threshold: int):
    """The keep mask of the block of rows first_t.. and columns first_s.. of attention matrix n: the hash of
    each element's flat index (n_global * T + t) * T + s in the global (N, T, T) array, in uint32 arithmetic
    (wrapping, as model.hash_bits). params_ref holds uint32 (seed 0, seed 1, n_offset, unused)."""
    seed0, seed1, n_offset = params_ref[0], params_ref[1], params_ref[2]
    # iota in int32 (what Triton's make_range gives), converted: values are small and non-negative.
    t_QC = (first_t + lax.broadcasted_iota(jnp.int32, shape, 0)).astype(jnp.uint32)
    s_QC = (first_s + lax.broadcasted_iota(jnp.int32, shape, 1)).astype(jnp.uint32)
    base = (n.astype(jnp.uint32) + n_offset) * jnp.uint32(T * T % 2**32)
    index_QC = base + t_QC * jnp.uint32(T) + s_QC
    bits_QC = index_bits(index_QC, seed0, seed1)
    return bits_QC >= jnp.uint32(threshold)


def _causal_scores(q_QK, k_CK, first_t, first_s, scale: float):
    """q k^T * scale in float32, -inf where the key is after the query."""
    s_QC = lax.dot_general(q_QK, k_CK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    shape = s_QC.shape
    t_QC = first_t + lax.broadcasted_iota(jnp.int32, shape, 0)
    s_idx_QC = first_s + lax.broadcasted_iota(jnp.int32, shape, 1)
    return jnp.where(s_idx_QC <= t_QC, s_QC, -jnp.inf)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a^T b, contracting the rows of both."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------- forward


def _forward_kernel(*refs, scale, rate, block_q, block_k, T):
    if rate > 0:
        params_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        params_ref = None
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    n, i = pl.program_id(0), pl.program_id(1)
    first_t = i * block_q
    q_QK = q_ref[...]
    K = q_QK.shape[-1]

    def body(j, carry):
        m_Q, l_Q, o_QK = carry
        first_s = j * block_k
        k_CK = k_ref[pl.ds(first_s, block_k), :]
        v_CK = v_ref[pl.ds(first_s, block_k), :]
        s_QC = _causal_scores(q_QK, k_CK, first_t, first_s, scale)
        # Finite from the first block on: key 0 is in it and no query is before it.
        new_m_Q = jnp.maximum(m_Q, jnp.max(s_QC, axis=1))
        p_QC = jnp.exp(s_QC - new_m_Q[:, None])
        decay_Q = jnp.exp(m_Q - new_m_Q)
        l_Q = l_Q * decay_Q + jnp.sum(p_QC, axis=1)
        if rate > 0:
            keep_QC = _keep_QC(params_ref, n, first_t, first_s, p_QC.shape, T, keep_threshold(rate))
            p_QC = jnp.where(keep_QC, p_QC / (1.0 - rate), 0.0)
        o_QK = o_QK * decay_Q[:, None] + _dot(p_QC.astype(v_CK.dtype), v_CK)
        return new_m_Q, l_Q, o_QK

    start = (
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        jnp.zeros((block_q, K), jnp.float32),
    )
    n_blocks = lax.div((i + 1) * block_q + block_k - 1, block_k)  # up to the diagonal
    m_Q, l_Q, o_QK = lax.fori_loop(0, n_blocks, body, start)
    o_ref[...] = (o_QK / l_Q[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m_Q + jnp.log(l_Q)


def _compiler_params(block_a: int, block_b: int):
    # Triton's CompilerParams in every version: without them jax 0.10.x lowers to Mosaic GPU instead.
    return pltriton.CompilerParams(num_warps=4 if block_a * block_b <= 64 * 64 else 8, num_stages=2)


def _params_spec():
    return pl.BlockSpec((4,), lambda n, i: (0,))


def _forward(q_NTK, k_NTK, v_NTK, params_4, *, scale, rate, block_q, block_k, interpret):
    N, T, K = q_NTK.shape
    kernel = functools.partial(_forward_kernel, scale=scale, rate=rate, block_q=block_q, block_k=block_k, T=T)
    row_spec = pl.BlockSpec((None, block_q, K), lambda n, i: (n, i, 0))
    all_spec = pl.BlockSpec((None, T, K), lambda n, i: (n, 0, 0))
    in_specs = [row_spec, all_spec, all_spec]
    args = [q_NTK, k_NTK, v_NTK]
    if rate > 0:
        in_specs, args = [_params_spec()] + in_specs, [params_4] + args
    return pl.pallas_call(
        kernel,
        grid=(N, T // block_q),
        in_specs=in_specs,
        out_specs=[row_spec, pl.BlockSpec((None, block_q), lambda n, i: (n, i))],
        out_shape=[
            jax.ShapeDtypeStruct((N, T, K), q_NTK.dtype),
            jax.ShapeDtypeStruct((N, T), jnp.float32),
        ],
        compiler_params=_compiler_params(block_q, block_k),
        interpret=interpret,
        name="flash_attention_forward",
    )(*args)


# ---------------------------------------------------------------------------------------------- backward


def _delta_kernel(o_ref, do_ref, delta_ref):
    delta_ref[...] = jnp.sum(o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32), axis=1)


def _probabilities(params_ref, n, q_QK, k_CK, lse_Q, first_t, first_s, *, scale, rate, T):
    """P (the softmax, float32) of one block, and P_drop = where(keep, P / (1 - rate), 0) with its keep
    mask (None without dropout)."""
    s_QC = _causal_scores(q_QK, k_CK, first_t, first_s, scale)
    p_QC = jnp.exp(s_QC - lse_Q[:, None])
    if rate == 0:
        return p_QC, p_QC, None
    keep_QC = _keep_QC(params_ref, n, first_t, first_s, p_QC.shape, T, keep_threshold(rate))
    return p_QC, jnp.where(keep_QC, p_QC / (1.0 - rate), 0.0), keep_QC


def _ds(p_QC, keep_QC, do_QK, v_CK, delta_Q, rate):
    """dS = P * (dP - D), dP = dP_drop * keep / (1 - rate), dP_drop = dO V^T."""
    dp_QC = lax.dot_general(do_QK, v_CK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if rate > 0:
        dp_QC = jnp.where(keep_QC, dp_QC / (1.0 - rate), 0.0)
    return p_QC * (dp_QC - delta_Q[:, None])


def _dkv_kernel(*refs, scale, rate, block_q, block_k, T):
    if rate > 0:
        params_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        params_ref = None
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    n, j = pl.program_id(0), pl.program_id(1)
    first_s = j * block_k
    k_CK, v_CK = k_ref[...], v_ref[...]
    K = k_CK.shape[-1]

    def body(i, carry):
        dk_CK, dv_CK = carry
        first_t = i * block_q
        rows = pl.ds(first_t, block_q)
        q_QK, do_QK = q_ref[rows, :], do_ref[rows, :]
        p_QC, pdrop_QC, keep_QC = _probabilities(
            params_ref, n, q_QK, k_CK, lse_ref[rows], first_t, first_s, scale=scale, rate=rate, T=T
        )
        dv_CK = dv_CK + _dot_tn(pdrop_QC.astype(do_QK.dtype), do_QK)
        ds_QC = _ds(p_QC, keep_QC, do_QK, v_CK, delta_ref[rows], rate)
        dk_CK = dk_CK + _dot_tn(ds_QC.astype(q_QK.dtype), q_QK)
        return dk_CK, dv_CK

    zeros = jnp.zeros((block_k, K), jnp.float32)
    first_block = lax.div(first_s, block_q)  # query blocks before it see none of these keys
    dk_CK, dv_CK = lax.fori_loop(first_block, T // block_q, body, (zeros, zeros))
    dk_ref[...] = (dk_CK * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CK.astype(dv_ref.dtype)


def _dq_kernel(*refs, scale, rate, block_q, block_k, T):
    if rate > 0:
        params_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        params_ref = None
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    n, i = pl.program_id(0), pl.program_id(1)
    first_t = i * block_q
    q_QK, do_QK, lse_Q, delta_Q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    K = q_QK.shape[-1]

    def body(j, dq_QK):
        first_s = j * block_k
        k_CK = k_ref[pl.ds(first_s, block_k), :]
        v_CK = v_ref[pl.ds(first_s, block_k), :]
        p_QC, _, keep_QC = _probabilities(
            params_ref, n, q_QK, k_CK, lse_Q, first_t, first_s, scale=scale, rate=rate, T=T
        )
        ds_QC = _ds(p_QC, keep_QC, do_QK, v_CK, delta_Q, rate)
        return dq_QK + _dot(ds_QC.astype(k_CK.dtype), k_CK)

    n_blocks = lax.div((i + 1) * block_q + block_k - 1, block_k)
    dq_QK = lax.fori_loop(0, n_blocks, body, jnp.zeros((block_q, K), jnp.float32))
    dq_ref[...] = (dq_QK * scale).astype(dq_ref.dtype)


def _backward(
    q_NTK, k_NTK, v_NTK, params_4, o_NTK, lse_NT, do_NTK, *, scale, rate, block_q, block_k, interpret
):
    N, T, K = q_NTK.shape
    statics = dict(scale=scale, rate=rate, block_q=block_q, block_k=block_k, T=T)
    q_rows = pl.BlockSpec((None, block_q, K), lambda n, i: (n, i, 0))
    q_vec = pl.BlockSpec((None, block_q), lambda n, i: (n, i))
    k_rows = pl.BlockSpec((None, block_k, K), lambda n, j: (n, j, 0))
    all_rows = pl.BlockSpec((None, T, K), lambda n, _: (n, 0, 0))
    all_vec = pl.BlockSpec((None, T), lambda n, _: (n, 0))
    extra_specs, extra_args = ([_params_spec()], [params_4]) if rate > 0 else ([], [])

    delta_NT = pl.pallas_call(
        _delta_kernel,
        grid=(N, T // block_q),
        in_specs=[q_rows, q_rows],
        out_specs=q_vec,
        out_shape=jax.ShapeDtypeStruct((N, T), jnp.float32),
        compiler_params=_compiler_params(block_q, 16),
        interpret=interpret,
        name="flash_attention_delta",
    )(o_NTK, do_NTK)

    dk_NTK, dv_NTK = pl.pallas_call(
        functools.partial(_dkv_kernel, **statics),
        grid=(N, T // block_k),
        in_specs=extra_specs + [all_rows, k_rows, k_rows, all_rows, all_vec, all_vec],
        out_specs=[k_rows, k_rows],
        out_shape=[
            jax.ShapeDtypeStruct(k_NTK.shape, k_NTK.dtype),
            jax.ShapeDtypeStruct(v_NTK.shape, v_NTK.dtype),
        ],
        compiler_params=_compiler_params(block_q, block_k),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*extra_args, q_NTK, k_NTK, v_NTK, do_NTK, lse_NT, delta_NT)

    dq_NTK = pl.pallas_call(
        functools.partial(_dq_kernel, **statics),
        grid=(N, T // block_q),
        in_specs=extra_specs + [q_rows, all_rows, all_rows, q_rows, q_vec, q_vec],
        out_specs=q_rows,
        out_shape=jax.ShapeDtypeStruct(q_NTK.shape, q_NTK.dtype),
        compiler_params=_compiler_params(block_q, block_k),
        interpret=interpret,
        name="flash_attention_dq",
    )(*extra_args, q_NTK, k_NTK, v_NTK, do_NTK, lse_NT, delta_NT)
    return dq_NTK, dk_NTK, dv_NTK


# ------------------------------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q_NTK, k_NTK, v_NTK, params_4, scale, rate, block_q, block_k, interpret):
    return _flash_fwd(q_NTK, k_NTK, v_NTK, params_4, scale, rate, block_q, block_k, interpret)[0]


def _flash_fwd(q_NTK, k_NTK, v_NTK, params_4, scale, rate, block_q, block_k, interpret):
    statics = dict(scale=scale, rate=rate, block_q=block_q, block_k=block_k, interpret=interpret)
    o_NTK, lse_NT = _forward(q_NTK, k_NTK, v_NTK, params_4, **statics)
    return o_NTK, (q_NTK, k_NTK, v_NTK, params_4, o_NTK, lse_NT)


def _flash_bwd(scale, rate, block_q, block_k, interpret, residuals, do_NTK):
    statics = dict(scale=scale, rate=rate, block_q=block_q, block_k=block_k, interpret=interpret)
    dq, dk, dv = _backward(*residuals, do_NTK.astype(residuals[4].dtype), **statics)
    return dq, dk, dv, None  # no gradient for the seed / offset


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(requested: int, T: int, name: str) -> int:
    block = min(requested, T)
    if block < 16 or block & (block - 1) or T % block:
        raise ValueError(f"{name}={block} (from {requested}, T={T}): must be a power of two >= 16 dividing T")
    return block


def flash_attention(
    q_NTK,
    k_NTK,
    v_NTK,
    seed_2,
    *,
    scale: float,
    dropout_rate: float = 0.0,
    n_offset=0,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
):
    """Causal softmax(q k^T * scale) v with the model's hash dropout on the weights; out_NTK in q's dtype.

    q, k, v: (N, T, K), float32 or bfloat16 (k and v are cast to q's dtype); products and the softmax run
    in float32. seed_2: uint32[2] (ignored when dropout_rate == 0). n_offset: this slice's first index
    into the global N (shard_map), so the masks are the global array's. Blocks larger than T become T;
    they must be powers of two >= 16 dividing T, and K a power of two >= 16 (Triton's tile rules)."""
    N, T, K = q_NTK.shape
    if k_NTK.shape != q_NTK.shape or v_NTK.shape != q_NTK.shape:
        raise ValueError(f"q, k, v shapes differ: {q_NTK.shape}, {k_NTK.shape}, {v_NTK.shape}")
    if K < 16 or K & (K - 1):
        raise ValueError(f"head size {K} must be a power of two >= 16")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate {dropout_rate} must be in [0, 1)")
    block_q, block_k = _block(block_q, T, "block_q"), _block(block_k, T, "block_k")
    k_NTK, v_NTK = k_NTK.astype(q_NTK.dtype), v_NTK.astype(q_NTK.dtype)
    if dropout_rate > 0:
        seed_2 = jnp.asarray(seed_2).astype(jnp.uint32)
        offset = jnp.asarray(n_offset).astype(jnp.uint32)
        params_4 = jnp.stack([seed_2[0], seed_2[1], offset, jnp.uint32(0)])
    else:
        params_4 = jnp.zeros((4,), jnp.uint32)  # unused
    return _flash(
        q_NTK, k_NTK, v_NTK, params_4, float(scale), float(dropout_rate), block_q, block_k, bool(interpret)
    )
