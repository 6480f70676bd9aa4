"""The seed's GPT as one Flax Linen model for training, evaluation and cached decoding.

Parameters are a plain pytree and every entry point is a pure function of them. Attention takes an
optional explicit key/value buffer and the absolute position of its first query, so the sampler
prefills a prompt block by block and decodes token by token (or a few drafted tokens at a time) with
the same blocks. The seed's architecture is the default; the options after it (ReLU squared or GELU,
QK-norm, rotary positions, zero-initialized output projections) are off unless a config turns them on.

Shape suffixes, one meaning each across the package:
    B batch rows            T positions of a pass (queries)    S key positions
    L key/value buffer length (= block_size)                   D model width (n_embd)
    H heads                 K head size                        N = B*H, the rows of attention
    F MLP width             V vocabulary                       W a window of T + 1 tokens
    G micro-batches of an optimizer step                       M optimizer steps of one jitted call
    E batches of one evaluation call                           C tokens of one decode call
    Z tokens of a corpus split
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from orpheus_jax import attention
from orpheus_jax.hashing import hash_bits, keep_threshold
from orpheus_jax.quantize import cast_weights, int8_product

KVBuffers = tuple  # per layer: (key_NLK, value_NLK)

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
    pos_encoding: str = "learned"  # or "sinusoidal", "rope"
    attn_scale: str = "head"  # scores * head_size**-0.5; "embd": * n_embd**-0.5, as the seed's code
    dtype: str = "float32"  # compute dtype; parameters stay float32
    dropout_rng: str = "hash"  # or "jax" (what runs saved before the key existed used: config.load)
    mlp_activation: str = "relu"  # or "relu2", "gelu"
    qk_norm: bool = False
    zero_init_proj: bool = False
    attention: str = "auto"  # see attention.py
    token_embedding: str = "onehot"  # or "gather"
    kv_block: int = 64  # cached attention reads the key/value buffer in blocks of this many positions

    @classmethod
    def from_run_config(cls, cfg, vocab_size: int) -> "GPTConfig":
        # A key a run's config lacks takes the seed architecture's value.
        fields = [f for f in dataclasses.fields(cls) if f.name != "vocab_size"]
        return cls(vocab_size=vocab_size, **{f.name: cfg.get(f.name, f.default) for f in fields})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_block(self) -> int:
        """Positions per block of the key/value buffer: kv_block where it tiles the buffer, else all of it."""
        return self.kv_block if self.block_size % self.kv_block == 0 else self.block_size


def prepare(config: GPTConfig) -> None:
    """What must be settled before the model is traced: whether cuDNN's attention runs here."""
    if attention.uses_fused(config.attention, dropout_active=False):
        attention.cudnn_works(jnp.dtype(config.dtype).name, config.head_size)


def sinusoidal_positions(pos_T: jax.Array, dim: int) -> jax.Array:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim))
    angle_TI = pos_T[:, None].astype(jnp.float32) * inv_freq[None, :]
    return jnp.stack([jnp.sin(angle_TI), jnp.cos(angle_TI)], axis=-1).reshape(pos_T.shape[0], dim)[:, :dim]


def rope_tables(pos_T: jax.Array, head_size: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin (float32, [T, head_size // 2]) of rope's angles p / 10000^(2i/K) at positions pos_T."""
    inv_freq_I = 1.0 / (10000.0 ** (np.arange(head_size // 2) * 2 / head_size))
    angle_TI = pos_T[:, None].astype(jnp.float32) * inv_freq_I[None, :]
    return jnp.cos(angle_TI), jnp.sin(angle_TI)


def rope(x_BTHK: jax.Array, pos_T: jax.Array) -> jax.Array:
    """Rotary position embedding: the head's two halves, (x1, x2) at position p, rotated by the angle
    p / 10000^(2i/K) in each plane i, so that q . k depends on the positions only through their difference."""
    half = x_BTHK.shape[-1] // 2
    cos_TI, sin_TI = rope_tables(pos_T, x_BTHK.shape[-1])
    cos, sin = cos_TI[:, None, :], sin_TI[:, None, :]  # broadcast over heads
    x1, x2 = x_BTHK[..., :half].astype(jnp.float32), x_BTHK[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BTHK.dtype)


def rms_norm(x: jax.Array) -> jax.Array:
    """x / rms(x) over the last axis, in float32, without parameters (QK-norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


class Dropout(nn.Module):
    """Inverted dropout, with its bits from JAX's PRNG (as nn.Dropout) or from `hash_bits`."""

    rate: float
    rng: str = "hash"

    def seed_bits(self) -> jax.Array:
        """The two uint32 words the hash masks of this call are drawn from."""
        return jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if deterministic or self.rate == 0:
            return x
        if self.rng == "hash":
            keep = hash_bits(x.shape, self.seed_bits()) >= jnp.uint32(keep_threshold(self.rate))
        else:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def dense_input_axes(names) -> int:
    """How many leading axes of a Dense kernel are its input axes, from the names on its params path
    (e.g. ("block_0", "attn", "proj", "kernel")): 2 for the attention output projection, which takes
    (heads, head size), else 1."""
    return 2 if names[-2] == "proj" else 1


def decoding_weights(params, weights: str):
    """The parameters with their Dense kernels in `weights` ("float32", "bfloat16", "int8"): quantize.py."""
    return cast_weights(params, weights, dense_input_axes)


class Dense(nn.Module):
    """x @ kernel (+ bias), contracting x's last n_in axes with the kernel's first n_in (nn.DenseGeneral's
    parameters and initialization).

    For decoding the kernel may be stored in bfloat16, or in int8 with a float32 "kernel_scale" per output
    (quantize.cast_weights); the product then runs in that type (int8: x quantized per row), so no float
    copy of the kernel is made."""

    features: tuple
    n_in: int = 1
    use_bias: bool = True
    dtype: str = "float32"  # compute dtype of a float32 kernel
    f32_out: bool = False  # products that feed sums and softmax: float32 even with bf16 inputs
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in :]
        # Drawn flat and reshaped, as DenseGeneral does, so initial weights are the same.
        init = nn.initializers.zeros if self.zero_init else _init
        kernel = self.param(
            "kernel",
            lambda key, shape: init(key, (math.prod(in_shape), math.prod(self.features))).reshape(shape),
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
                y2 = int8_product(x2, kernel, scale, dims, self.n_in, out_dtype)
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
        q_BTHK, k_BTHK, v_BTHK = (
            Dense((H, K), use_bias=False, dtype=c.dtype, name=name)(x_BTD)
            for name in ("query", "key", "value")
        )
        if c.qk_norm:
            q_BTHK, k_BTHK = rms_norm(q_BTHK), rms_norm(k_BTHK)
        if c.pos_encoding == "rope":
            q_BTHK, k_BTHK = rope(q_BTHK, pos_T), rope(k_BTHK, pos_T)
        scale = c.head_size**-0.5 if c.attn_scale == "head" else c.n_embd**-0.5
        weights_dropout = Dropout(c.dropout, c.dropout_rng)  # on the attention weights
        dropout_active = not deterministic and c.dropout > 0

        if kv is None and attention.uses_fused(c.attention, dropout_active):
            out_BTHK = attention.attend_fused(q_BTHK, k_BTHK, v_BTHK, scale, c.dtype)
        else:
            # Batch and heads merged, positions next (N = B*H): the layout of both attention matmuls. The
            # buffer is kept in it too, so its update feeds the matmul directly; any reshape in between
            # led XLA:CPU to fuse the update twice and copy every buffer at every decode step.
            q_NTK, k_NTK, v_NTK = (
                x.transpose(0, 2, 1, 3).reshape(B * H, T, K) for x in (q_BTHK, k_BTHK, v_BTHK)
            )
            if (
                kv is not None
            ):  # write this chunk into the buffer at its positions, attend to the filled blocks
                at = (0, pos_T[0], 0)
                kv = tuple(
                    lax.dynamic_update_slice(buffer_NLK, new_NTK.astype(buffer_NLK.dtype), at)
                    for buffer_NLK, new_NTK in zip(kv, (k_NTK, v_NTK))
                )
                out_NTK = attention.attend_buffer(q_NTK, *kv, pos_T, scale, c.dtype, c.attention_block)
            elif c.attention == "pallas":
                out_NTK = self._pallas(q_NTK, k_NTK, v_NTK, scale, weights_dropout, dropout_active)
            else:
                drop = lambda p: weights_dropout(p, deterministic=deterministic)
                out_NTK = attention.attend(q_NTK, k_NTK, v_NTK, pos_T, scale, c.dtype, drop)
            out_BTHK = out_NTK.reshape(B, H, T, K).transpose(0, 2, 1, 3)
        y_BTD = Dense(
            (c.n_embd,), n_in=2, dtype=c.dtype, f32_out=True, zero_init=c.zero_init_proj, name="proj"
        )(out_BTHK)
        return Dropout(c.dropout, c.dropout_rng)(y_BTD, deterministic=deterministic), kv

    def _pallas(self, q_NTK, k_NTK, v_NTK, scale, weights_dropout, dropout_active):
        """Our Pallas kernel, its dropout masks the hash bits of the same seed as attention "xla" draws
        (the same Dropout module's key). Over several devices XLA gathers its inputs (a custom call has
        no partitioning rule): the same numbers, each device doing all of it."""
        rate = self.config.dropout if dropout_active else 0.0
        seed_2 = weights_dropout.seed_bits() if dropout_active else jnp.zeros((2,), jnp.uint32)
        return attention.attend_pallas(q_NTK, k_NTK, v_NTK, seed_2, scale, rate)


def activation(name: str):
    return {"relu": nn.relu, "relu2": lambda x: jnp.square(nn.relu(x)), "gelu": lambda x: nn.gelu(x, False)}[
        name
    ]


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BTD, *, deterministic: bool):
        c = self.config
        h_BTF = Dense((4 * c.n_embd,), dtype=c.dtype, f32_out=True, name="fc")(x_BTD)
        h_BTF = activation(c.mlp_activation)(h_BTF).astype(c.dtype)
        y_BTD = Dense((c.n_embd,), dtype=c.dtype, f32_out=True, zero_init=c.zero_init_proj, name="out")(h_BTF)
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


class Table(nn.Module):
    """A table of `rows` vectors: nn.Embed's parameter ("embedding") and initialization."""

    rows: int
    features: int

    @nn.compact
    def __call__(self):
        return self.param("embedding", _init, (self.rows, self.features))


class GPT(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, tokens_BT, *, start=0, cache: KVBuffers | None = None, deterministic: bool = True):
        """Logits for tokens at absolute positions start .. start+T-1, and the updated buffers (or None).

        The token embedding is a one-hot product (token_embedding "onehot", at full float32 precision,
        so it equals the lookup): its gradient is a product too, where a lookup's is a scatter-add,
        which GPUs run with atomics (not deterministic). The learned positions are a slice of their
        table (its gradient a pad). With dtype bfloat16 the matmuls run in bf16, but the embeddings,
        the residual stream, LayerNorm statistics, attention scores, softmax and logits stay float32."""
        c = self.config
        T = tokens_BT.shape[1]
        pos_T = start + jnp.arange(T)
        wte_VD = Table(c.vocab_size, c.n_embd, name="wte")()
        if c.token_embedding == "onehot":
            one_hot_BTV = jax.nn.one_hot(tokens_BT, c.vocab_size, dtype=jnp.float32)
            x_BTD = jnp.dot(one_hot_BTV, wte_VD, precision=lax.Precision.HIGHEST)
        else:
            x_BTD = jnp.take(wte_VD, tokens_BT, axis=0)
        if c.pos_encoding == "learned":
            x_BTD = x_BTD + lax.dynamic_slice_in_dim(Table(c.block_size, c.n_embd, name="wpe")(), start, T)
        elif c.pos_encoding == "sinusoidal":
            x_BTD = x_BTD + sinusoidal_positions(pos_T, c.n_embd)
        new_cache = []
        for i in range(c.n_layer):
            layer_kv = None if cache is None else cache[i]
            x_BTD, kv = Block(c, name=f"block_{i}")(x_BTD, pos_T, layer_kv, deterministic=deterministic)
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


def forward_cached(config: GPTConfig, params, tokens_BT, cache: KVBuffers, start):
    """Logits for a chunk of tokens at positions start.., attending to the buffers: (logits, buffers)."""
    return GPT(config).apply({"params": params}, tokens_BT, start=start, cache=cache, deterministic=True)


def empty_buffers(config: GPTConfig, batch_size: int, dtype=None) -> KVBuffers:
    shape = (batch_size * config.n_head, config.block_size, config.head_size)
    dtype = dtype or config.dtype
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def matmul_params(params) -> int:
    """Parameters that multiply activations (every Dense kernel), the N of MFU's 6N FLOPs per token:
    the embeddings are looked up (a one-hot product is an implementation detail), not multiplied."""
    kernels = jax.tree_util.tree_leaves_with_path(params)
    return sum(math.prod(x.shape) for path, x in kernels if path[-1].key == "kernel")
