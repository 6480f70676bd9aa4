"""The seed's GPT as one Flax Linen model for training, evaluation and cached decoding.

Parameters are a plain pytree and every entry point is a pure function of them. Attention takes an
optional explicit key/value buffer and the absolute position of its first query, so the sampler
prefills a prompt block by block and decodes token by token with the same blocks.

Shape suffixes: B batch, T query positions, S key positions, L buffer length (= block_size),
D n_embd, H heads, K head size, N = B*H (attention batch), F MLP width, V vocabulary.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KVCache = tuple  # per layer: (key_NLK, value_NLK), N = B * H

_init = nn.initializers.normal(stddev=0.02)  # the seed's init for linears and embeddings
# LayerNorm epsilon 1e-5 as in PyTorch, so the seed's weights give the seed's logits.


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.2
    pos_encoding: str = "learned"  # or "sinusoidal"
    attn_scale: str = "head"  # scores * head_size**-0.5; "embd": * n_embd**-0.5, as the seed's code
    dtype: str = "float32"  # compute dtype; parameters stay float32
    dropout_rng: str = (
        "jax"  # or "hash" (the config files' default): bits from a counter hash, ~30x cheaper on CPU;
    )
    # "jax" here is what runs saved before the key existed used
    kv_block: int = 64  # cached attention reads the key/value buffer in blocks of this many positions

    @classmethod
    def from_run_config(cls, cfg, vocab_size: int) -> "GPTConfig":
        # A run saved before a key existed gets that key's default (e.g. dropout_rng).
        fields = [f for f in dataclasses.fields(cls) if f.name != "vocab_size"]
        return cls(vocab_size=vocab_size, **{f.name: cfg.get(f.name, f.default) for f in fields})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_block(self) -> int:
        """Positions per block of the key/value buffer: kv_block where it tiles the buffer, else all of it."""
        return self.kv_block if self.block_size % self.kv_block == 0 else self.block_size


def sinusoidal_positions(pos_T: jax.Array, dim: int) -> jax.Array:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim))
    angle_TI = pos_T[:, None].astype(jnp.float32) * inv_freq[None, :]
    return jnp.stack([jnp.sin(angle_TI), jnp.cos(angle_TI)], axis=-1).reshape(pos_T.shape[0], dim)[:, :dim]


def _hash_uint32(x):
    """murmur3's finalizer: a cheap, well-mixed 32-bit hash."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(shape, seed_2) -> jax.Array:
    """uint32 bits, a hash of (each element's flat index, seed): sharding-invariant, like JAX's threefry."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return _hash_uint32(_hash_uint32(index * jnp.uint32(0x9E3779B1) ^ seed_2[0]) ^ seed_2[1])


class Dropout(nn.Module):
    """Inverted dropout, with its bits from JAX's PRNG (as nn.Dropout) or from `hash_bits`."""

    rate: float
    rng: str = "jax"

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if deterministic or self.rate == 0:
            return x
        key = self.make_rng("dropout")
        if self.rng == "hash":
            keep = hash_bits(x.shape, jax.random.bits(key, (2,), jnp.uint32)) >= jnp.uint32(
                round(self.rate * 2**32)
            )
        else:
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def dense_input_axes(names) -> int:
    """How many leading axes of a Dense kernel are its input axes, from the names on its params path
    (e.g. ("block_0", "attn", "proj", "kernel")): 2 for the attention output projection, which takes
    (heads, head size), else 1."""
    return 2 if names[-2] == "proj" else 1


def _quantize_rows(x, n_in: int):
    """int8 values and float32 scales of x, symmetric, per row over its last n_in axes."""
    axes = tuple(range(x.ndim - n_in, x.ndim))
    scale = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True), 1e-30) / 127
    return jnp.round(x / scale).astype(jnp.int8), scale


class Dense(nn.Module):
    """x @ kernel (+ bias), contracting x's last n_in axes with the kernel's first n_in (nn.DenseGeneral's
    parameters and initialization).

    For decoding the kernel may be stored in bfloat16, or in int8 with a float32 "kernel_scale" per output
    (sampler.cast_weights); the product then runs in that type (int8: x quantized per row), so no float
    copy of the kernel is made."""

    features: tuple
    n_in: int = 1
    use_bias: bool = True
    dtype: str = "float32"  # compute dtype of a float32 kernel
    f32_out: bool = False  # products that feed sums and softmax: float32 even with bf16 inputs

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in :]
        # Drawn flat and reshaped, as DenseGeneral does, so initial weights are the same.
        kernel = self.param(
            "kernel",
            lambda key, shape: _init(key, (math.prod(in_shape), math.prod(self.features))).reshape(shape),
            in_shape + self.features,
        )
        out_dtype = jnp.float32 if self.f32_out else jnp.dtype(self.dtype)
        dims = ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ()))
        rows = math.prod(x.shape[: x.ndim - self.n_in])
        if kernel.dtype == jnp.float32:
            y = lax.dot_general(
                x.astype(self.dtype), kernel.astype(self.dtype), dims, preferred_element_type=out_dtype
            )
        else:
            # XLA:CPU turns a one-row product with a low-precision kernel into a float32 copy of the
            # kernel and a float32 matvec; with two rows it calls its native bf16/int8 kernels.
            x2 = jnp.concatenate([x, x]) if rows == 1 else x
            if kernel.dtype == jnp.int8:
                scale = self.param("kernel_scale", nn.initializers.ones, self.features)
                x_q, x_scale = _quantize_rows(x2, self.n_in)
                acc = lax.dot_general(x_q, kernel, dims, preferred_element_type=jnp.int32)
                x_scale = x_scale.reshape(x_scale.shape[: x2.ndim - self.n_in] + (1,) * len(self.features))
                y2 = (acc.astype(jnp.float32) * x_scale * scale).astype(out_dtype)
            else:
                y2 = lax.dot_general(x2.astype(kernel.dtype), kernel, dims, preferred_element_type=out_dtype)
            y = y2[:1] if rows == 1 else y2
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, self.features).astype(self.dtype)
        return y


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, pos_T, kv=None, *, deterministic: bool):
        c = self.config
        B, T, H, K = x_BTD.shape[0], x_BTD.shape[1], c.n_head, c.head_size
        # Batch and heads merged, positions next (N = B*H): the layout of both attention matmuls. The
        # buffer is kept in it too, so its update feeds the matmul directly; any reshape in between
        # led XLA:CPU to fuse the update twice and copy every buffer at every decode step.
        q_NTK, k_NTK, v_NTK = (
            Dense((H, K), use_bias=False, dtype=c.dtype, name=name)(x_BTD)
            .transpose(0, 2, 1, 3)
            .reshape(B * H, T, K)
            for name in ("query", "key", "value")
        )
        scale = c.head_size**-0.5 if c.attn_scale == "head" else c.n_embd**-0.5
        start = (jnp.full((B * H, T), -jnp.inf), jnp.zeros((B * H, T)), jnp.zeros((B * H, T, K)))

        if kv is None:  # training / full forward: the chunk's own keys, one block
            dropout = Dropout(c.dropout, c.dropout_rng)
            m_NT, l_NT, o_NTK = _attend_block(
                q_NTK,
                k_NTK,
                v_NTK,
                pos_T,
                pos_T,
                scale,
                c.dtype,
                start,
                lambda p: dropout(p, deterministic=deterministic),
            )
        else:  # write this chunk into the buffer at its positions, attend to the filled blocks
            at = (0, pos_T[0], 0)
            kv = tuple(
                lax.dynamic_update_slice(buffer_NLK, new_NTK.astype(buffer_NLK.dtype), at)
                for buffer_NLK, new_NTK in zip(kv, (k_NTK, v_NTK))
            )
            m_NT, l_NT, o_NTK = _attend_filled(q_NTK, *kv, pos_T, scale, c.dtype, start, c.attention_block)
        out_NTK = (o_NTK / l_NT[..., None]).astype(c.dtype)
        out_BTHK = out_NTK.reshape(B, H, T, K).transpose(0, 2, 1, 3)
        y_BTD = Dense((c.n_embd,), n_in=2, dtype=c.dtype, f32_out=True, name="proj")(out_BTHK)
        return Dropout(c.dropout, c.dropout_rng)(y_BTD, deterministic=deterministic), kv


def _attend_block(q_NTK, k_NSK, v_NSK, pos_T, pos_S, scale, dtype, carry, drop=lambda p: p):
    """Fold one block of keys into a running softmax (flash attention's recurrence): carry = (max m_NT,
    sum l_NT, unnormalized output o_NTK), all float32. Keys after a query's position are masked."""
    m_NT, l_NT, o_NTK = carry
    scores_NTS = (
        jnp.einsum("ntk,nsk->nts", q_NTK, k_NSK.astype(q_NTK.dtype), preferred_element_type=jnp.float32)
        * scale
    )
    # Causal by absolute position: buffer slots past the query (unwritten or stale) are masked too.
    scores_NTS = jnp.where(pos_S[None, :] <= pos_T[:, None], scores_NTS, -jnp.inf)
    new_m_NT = jnp.maximum(
        m_NT, scores_NTS.max(axis=-1)
    )  # finite: every block after the first has key 0's max
    p_NTS = jnp.exp(scores_NTS - new_m_NT[..., None])
    decay_NT = jnp.exp(m_NT - new_m_NT)
    l_NT = l_NT * decay_NT + p_NTS.sum(axis=-1)
    # Dropout on the unnormalized weights is dropout on the softmax: each row is divided by l_NT later.
    pv_NTK = jnp.einsum(
        "nts,nsk->ntk", drop(p_NTS.astype(dtype)), v_NSK.astype(dtype), preferred_element_type=jnp.float32
    )
    return new_m_NT, l_NT, o_NTK * decay_NT[..., None] + pv_NTK


def _attend_filled(q_NTK, k_NLK, v_NLK, pos_T, scale, dtype, carry, block: int):
    """Attention over the buffer's blocks up to the last query's position: the rest is never read.

    Except for a single query (a decode step): XLA copies each block it slices out of the buffer
    before the product, which for one query costs more than the product itself, so it reads the
    whole buffer in one product (measured on CPU: 7.0 ms a batch-16 step against 11.5 ms for the
    block loop at positions past 128)."""
    L = k_NLK.shape[1]
    if q_NTK.shape[1] == 1 or block == L:
        return _attend_block(q_NTK, k_NLK, v_NLK, pos_T, jnp.arange(L), scale, dtype, carry)
    n_blocks = (pos_T[-1] + block) // block

    def one_block(j, carry):
        first = j * block
        k_NSK, v_NSK = (lax.dynamic_slice_in_dim(b_NLK, first, block, axis=1) for b_NLK in (k_NLK, v_NLK))
        return _attend_block(q_NTK, k_NSK, v_NSK, pos_T, first + jnp.arange(block), scale, dtype, carry)

    return lax.fori_loop(0, n_blocks, one_block, carry)


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, *, deterministic: bool):
        c = self.config
        h_BTF = nn.relu(Dense((4 * c.n_embd,), dtype=c.dtype, f32_out=True, name="fc")(x_BTD)).astype(c.dtype)
        y_BTD = Dense((c.n_embd,), dtype=c.dtype, f32_out=True, name="out")(h_BTF)
        return Dropout(c.dropout, c.dropout_rng)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, pos_T, kv=None, *, deterministic: bool):
        c = self.config
        h_BTD, kv = CausalSelfAttention(c, name="attn")(
            nn.LayerNorm(epsilon=1e-5, dtype=c.dtype, name="ln1")(x_BTD),
            pos_T,
            kv,
            deterministic=deterministic,
        )
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + MLP(c, name="mlp")(
            nn.LayerNorm(epsilon=1e-5, dtype=c.dtype, name="ln2")(x_BTD), deterministic=deterministic
        )
        return x_BTD, kv


class GPT(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, tokens_BT, *, start=0, cache: KVCache | None = None, deterministic: bool = True):
        """Logits for tokens at absolute positions start .. start+T-1, and the updated cache (or None).

        With dtype bfloat16 the matmuls run in bf16, but the embedding lookups (whose gradient is a
        scatter-add), the residual stream, LayerNorm statistics, attention scores, softmax and logits
        stay float32."""
        c = self.config
        pos_T = start + jnp.arange(tokens_BT.shape[1])
        x_BTD = nn.Embed(c.vocab_size, c.n_embd, embedding_init=_init, name="wte")(tokens_BT)
        if c.pos_encoding == "learned":
            x_BTD = x_BTD + nn.Embed(c.block_size, c.n_embd, embedding_init=_init, name="wpe")(pos_T)
        else:
            x_BTD = x_BTD + sinusoidal_positions(pos_T, c.n_embd)
        new_cache = []
        for i in range(c.n_layer):
            x_BTD, kv = Block(c, name=f"block_{i}")(
                x_BTD, pos_T, None if cache is None else cache[i], deterministic=deterministic
            )
            new_cache.append(kv)
        x_BTD = nn.LayerNorm(epsilon=1e-5, dtype=c.dtype, name="ln_f")(x_BTD)
        logits_BTV = Dense((c.vocab_size,), dtype=c.dtype, f32_out=True, name="lm_head")(x_BTD)
        return logits_BTV.astype(jnp.float32), None if cache is None else tuple(new_cache)


def init_params(config: GPTConfig, key: jax.Array):
    tokens = jnp.zeros((1, config.block_size), jnp.int32)
    return GPT(config).init(key, tokens)["params"]


def forward(config: GPTConfig, params, tokens_BT, rng=None, deterministic: bool = True):
    """Logits_BTV (float32) of a full causal pass; rng feeds dropout when not deterministic."""
    rngs = None if deterministic else {"dropout": rng}
    logits_BTV, _ = GPT(config).apply({"params": params}, tokens_BT, deterministic=deterministic, rngs=rngs)
    return logits_BTV


def forward_cached(config: GPTConfig, params, tokens_BT, cache: KVCache, start):
    """Logits for a chunk of tokens at positions start.., attending to the cache; returns (logits, cache)."""
    return GPT(config).apply({"params": params}, tokens_BT, start=start, cache=cache, deterministic=True)


def empty_cache(config: GPTConfig, batch_size: int, dtype=None) -> KVCache:
    shape = (batch_size * config.n_head, config.block_size, config.head_size)
    dtype = dtype or config.dtype
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
