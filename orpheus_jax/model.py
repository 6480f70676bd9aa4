"""The seed's GPT as one Flax Linen model for training, evaluation and cached decoding.

Parameters are a plain pytree and every entry point is a pure function of them. Attention takes an
optional explicit key/value buffer and the absolute position of its first query, so the sampler
prefills a whole prompt in one pass and decodes token by token with the same blocks.

Shape suffixes: B batch, T query positions, S key positions, L buffer length (= block_size),
D n_embd, H heads, K head size, N = B*H (attention batch), F MLP width, V vocabulary.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KVCache = tuple  # per layer: (key_NLK, value_NLK), N = B * H

_init = nn.initializers.normal(stddev=0.02)  # the seed's init for linears and embeddings
# bf16 inputs, float32 products and sums: for attention scores and logits, which softmax amplifies.
_f32_dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)
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
    dropout_rng: str = "jax"  # "hash": dropout bits from a counter hash, ~30x cheaper than JAX's PRNG on CPU

    @classmethod
    def from_run_config(cls, cfg, vocab_size: int) -> "GPTConfig":
        # A run saved before a key existed gets that key's default (e.g. dropout_rng).
        fields = [f for f in dataclasses.fields(cls) if f.name != "vocab_size"]
        return cls(vocab_size=vocab_size, **{f.name: cfg.get(f.name, f.default) for f in fields})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


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
            keep = hash_bits(x.shape, jax.random.bits(key, (2,), jnp.uint32)) >= jnp.uint32(round(self.rate * 2**32))
        else:
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, pos_T, kv=None, *, deterministic: bool):
        c = self.config
        dense_heads = lambda name: nn.DenseGeneral((c.n_head, c.head_size), use_bias=False, dtype=c.dtype,
                                                   kernel_init=_init, name=name)
        B, T, H, K = x_BTD.shape[0], x_BTD.shape[1], c.n_head, c.head_size
        # Batch and heads merged, positions next (N = B*H): the layout of both attention matmuls. The
        # buffer is kept in it too, so its update feeds the matmul directly; any reshape in between
        # led XLA:CPU to fuse the update twice and copy every buffer at every decode step.
        q_NTK, k_NTK, v_NTK = (dense_heads(name)(x_BTD).transpose(0, 2, 1, 3).reshape(B * H, T, K)
                               for name in ("query", "key", "value"))

        if kv is None:  # training / full forward: attend within the chunk
            k_NSK, v_NSK, pos_S = k_NTK, v_NTK, pos_T
        else:  # write this chunk into the buffer at its positions, attend over the whole buffer
            at = (0, pos_T[0], 0)
            k_NSK, v_NSK = (lax.dynamic_update_slice(buffer_NLK, new_NTK.astype(buffer_NLK.dtype), at)
                            for buffer_NLK, new_NTK in zip(kv, (k_NTK, v_NTK)))
            kv = (k_NSK, v_NSK)
            pos_S = jnp.arange(k_NSK.shape[1])

        scale = c.head_size ** -0.5 if c.attn_scale == "head" else c.n_embd ** -0.5
        scores_NTS = jnp.einsum("ntk,nsk->nts", q_NTK, k_NSK.astype(q_NTK.dtype),
                                preferred_element_type=jnp.float32) * scale
        # Causal by absolute position: buffer slots past the query (unwritten or stale) are masked too.
        visible_TS = pos_S[None, :] <= pos_T[:, None]
        scores_NTS = jnp.where(visible_TS, scores_NTS, jnp.finfo(jnp.float32).min)
        weights_NTS = jax.nn.softmax(scores_NTS, axis=-1).astype(c.dtype)
        weights_NTS = Dropout(c.dropout, c.dropout_rng)(weights_NTS, deterministic=deterministic)
        out_NTK = jnp.einsum("nts,nsk->ntk", weights_NTS, v_NSK.astype(c.dtype))
        out_BTHK = out_NTK.reshape(B, H, T, K).transpose(0, 2, 1, 3)
        y_BTD = nn.DenseGeneral(c.n_embd, axis=(-2, -1), dtype=c.dtype, dot_general=_f32_dot, kernel_init=_init,
                                name="proj")(out_BTHK)
        return Dropout(c.dropout, c.dropout_rng)(y_BTD, deterministic=deterministic), kv


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, *, deterministic: bool):
        c = self.config
        h_BTF = nn.relu(nn.Dense(4 * c.n_embd, dtype=c.dtype, dot_general=_f32_dot, kernel_init=_init,
                                 name="fc")(x_BTD)).astype(c.dtype)
        y_BTD = nn.Dense(c.n_embd, dtype=c.dtype, dot_general=_f32_dot, kernel_init=_init, name="out")(h_BTF)
        return Dropout(c.dropout, c.dropout_rng)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, pos_T, kv=None, *, deterministic: bool):
        c = self.config
        h_BTD, kv = CausalSelfAttention(c, name="attn")(
            nn.LayerNorm(epsilon=1e-5, dtype=c.dtype, name="ln1")(x_BTD), pos_T, kv, deterministic=deterministic)
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + MLP(c, name="mlp")(nn.LayerNorm(epsilon=1e-5, dtype=c.dtype, name="ln2")(x_BTD), deterministic=deterministic)
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
            x_BTD, kv = Block(c, name=f"block_{i}")(x_BTD, pos_T, None if cache is None else cache[i],
                                                    deterministic=deterministic)
            new_cache.append(kv)
        x_BTD = nn.LayerNorm(epsilon=1e-5, dtype=c.dtype, name="ln_f")(x_BTD)
        logits_BTV = nn.Dense(c.vocab_size, dtype=c.dtype, dot_general=_f32_dot, kernel_init=_init,
                              name="lm_head")(x_BTD)
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
