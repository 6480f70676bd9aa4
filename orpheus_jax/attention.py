"""Causal attention's implementations, chosen by the config key `attention`:

- "xla": our own einsums, the flash-attention recurrence over key blocks (`attend_block`); the only
  one that reads a key/value buffer (decoding) and the reference the others are tested against.
- "fused": jax.nn.dot_product_attention (cuDNN's fused kernel on NVIDIA GPUs where it works, XLA's
  otherwise), for passes without attention dropout: it has no dropout argument.
- "pallas": our Pallas kernel (pallas_attention.py), with the hash dropout masks regenerated in the
  backward pass; on GPU through Triton, elsewhere in Pallas' interpreter (tests).
- "auto": "fused" for passes without attention dropout on an accelerator, "xla" otherwise.

Shape suffixes as in model.py: N = B*H rows of attention, T queries, S keys, L buffer, K head size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def attend_block(q_NTK, k_NSK, v_NSK, pos_T, pos_S, scale, dtype, carry, drop=lambda p: p):
    """Fold one block of keys into a running softmax (flash attention's recurrence): carry = (max m_NT,
    sum l_NT, unnormalized output o_NTK), all float32. Keys after a query's position are masked."""
    m_NT, l_NT, o_NTK = carry
    scores_NTS = jnp.einsum(
        "ntk,nsk->nts", q_NTK, k_NSK.astype(q_NTK.dtype), preferred_element_type=jnp.float32
    )
    # Causal by absolute position: buffer slots past the query (unwritten or stale) are masked too.
    scores_NTS = jnp.where(pos_S[None, :] <= pos_T[:, None], scores_NTS * scale, -jnp.inf)
    new_m_NT = jnp.maximum(m_NT, scores_NTS.max(axis=-1))  # finite: every block has key 0 or an earlier max
    p_NTS = jnp.exp(scores_NTS - new_m_NT[..., None])
    decay_NT = jnp.exp(m_NT - new_m_NT)
    l_NT = l_NT * decay_NT + p_NTS.sum(axis=-1)
    # Dropout on the unnormalized weights is dropout on the softmax: each row is divided by l_NT later.
    pv_NTK = jnp.einsum(
        "nts,nsk->ntk", drop(p_NTS.astype(dtype)), v_NSK.astype(dtype), preferred_element_type=jnp.float32
    )
    return new_m_NT, l_NT, o_NTK * decay_NT[..., None] + pv_NTK


def _start(q_NTK):
    N, T, K = q_NTK.shape
    return jnp.full((N, T), -jnp.inf), jnp.zeros((N, T)), jnp.zeros((N, T, K))


def _finish(carry, dtype):
    _, l_NT, o_NTK = carry
    return (o_NTK / l_NT[..., None]).astype(dtype)


def attend(q_NTK, k_NTK, v_NTK, pos_T, scale, dtype, drop=lambda p: p):
    """A chunk's queries over its own keys, causal (training, evaluation, a full forward pass)."""
    return _finish(attend_block(q_NTK, k_NTK, v_NTK, pos_T, pos_T, scale, dtype, _start(q_NTK), drop), dtype)


def attend_buffer(q_NTK, k_NLK, v_NLK, pos_T, scale, dtype, block: int):
    """Queries over a key/value buffer: a pass of whole blocks (a prefill) reads the buffer's blocks up
    to its last query's position only.

    A pass of fewer queries than a block (a decode step, a speculative pass) reads the whole buffer in
    one product: XLA copies each block it slices out of the buffer before the product, which for one
    query costs more than the product itself (benchmarks/RESULTS.md, 2026-11-26, midday); and a
    speculative pass then sums its attention as a step does."""
    L = k_NLK.shape[1]
    carry = _start(q_NTK)
    if q_NTK.shape[1] < block or block == L:
        return _finish(attend_block(q_NTK, k_NLK, v_NLK, pos_T, jnp.arange(L), scale, dtype, carry), dtype)

    def one_block(j, carry):
        first = j * block
        k_NSK, v_NSK = (lax.dynamic_slice_in_dim(b_NLK, first, block, axis=1) for b_NLK in (k_NLK, v_NLK))
        return attend_block(q_NTK, k_NSK, v_NSK, pos_T, first + jnp.arange(block), scale, dtype, carry)

    return _finish(lax.fori_loop(0, (pos_T[-1] + block) // block, one_block, carry), dtype)


def attend_fused(q_BTHK, k_BTHK, v_BTHK, scale, dtype):
    """jax.nn.dot_product_attention, causal: cuDNN's kernel where `cudnn_works` says it runs, else XLA's."""
    q_BTHK, k_BTHK, v_BTHK = (x.astype(dtype) for x in (q_BTHK, k_BTHK, v_BTHK))
    impl = "cudnn" if cudnn_works(jnp.dtype(dtype).name, q_BTHK.shape[-1]) else "xla"
    return jax.nn.dot_product_attention(
        q_BTHK, k_BTHK, v_BTHK, scale=scale, is_causal=True, implementation=impl
    )


def attend_pallas(q_NTK, k_NTK, v_NTK, seed_2, scale, rate):
    """pallas_attention.flash_attention: compiled through Triton on a GPU, run by Pallas' interpreter
    elsewhere (correct, and slow: the kernel is written for GPUs)."""
    from orpheus_jax.pallas_attention import flash_attention

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        _say_once(
            f"attention 'pallas' runs in Pallas' interpreter on {jax.default_backend()} "
            "(slow: it is a GPU kernel)"
        )
    return flash_attention(q_NTK, k_NTK, v_NTK, seed_2, scale=scale, dropout_rate=rate, interpret=not on_gpu)


@functools.cache
def _say_once(message: str) -> None:
    print(message, flush=True)


def uses_fused(attention: str, dropout_active: bool) -> bool:
    """Whether a full pass takes jax.nn.dot_product_attention (see the module's docstring)."""
    if dropout_active or attention in ("xla", "pallas"):
        return False
    return attention == "fused" or jax.default_backend() != "cpu"


@functools.cache
def cudnn_works(dtype: str, head_size: int) -> bool:
    """Whether cuDNN's fused attention compiles and runs here: NVIDIA GPUs only, bfloat16/float16, head
    size a multiple of 8; and jax's own tests find that cuDNN creates no execution plans on some CUDA
    versions. Tried once per process; a failure is one log line, then XLA's implementation is used.

    Call it before tracing (model.prepare does): inside a trace it must already be cached."""
    if jax.default_backend() != "gpu" or dtype not in ("bfloat16", "float16") or head_size % 8:
        return False
    x = np.zeros((1, 128, 1, head_size), dtype)
    try:
        fn = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"))
        jax.block_until_ready(fn(x))
        return True
    except Exception as e:  # cuDNN missing, no execution plan, unsupported GPU, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        _say_once(f"cuDNN attention unavailable here ({reason}); using XLA's attention instead")
        return False
