"""Cached sampling: a fixed-size key/value buffer per layer, a one-pass prefill, a compiled decode loop.

The buffer holds block_size positions. Learned absolute positions rule out a rolling buffer, so when
it is full the sampler keeps the last block_size - shift tokens and prefills them again: shift=1 is
the seed's crop-and-recompute exactly (every token sees the last block_size tokens); a larger shift
refills less often, each token then seeing between block_size - shift and block_size tokens.

Randomness is per row: row b draws token i with fold_in(row_key_b, i), so a row of a batch gives the
same text as a batch of one with that row's key. Everything a prompt changes (its tokens, its
length) is data, so one compilation serves every prompt for a given (batch, buffer, chunk).
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from orpheus_jax.model import GPTConfig, dense_input_axes, empty_cache, forward_cached
from orpheus_jax.sharding import batch_sharded, make_mesh, replicated


@flax.struct.dataclass
class DecodeState:
    cache: tuple  # per layer (key_NLK, value_NLK), N = batch * heads
    window_BL: jax.Array  # the tokens in the buffer, at positions 0 .. length-1
    length: jax.Array  # int32: how many positions of the buffer hold context
    logits_BV: jax.Array  # logits for the next token
    row_keys: jax.Array  # (B, key) raw key data
    drawn: jax.Array  # int32: tokens sampled so far (the fold_in index)


WEIGHTS = ("float32", "bfloat16", "int8")


def quantize_int8(kernel, n_in: int):
    """(int8 values, float32 scale per output): symmetric, the scale the largest |weight| over the
    kernel's n_in input axes / 127, so kernel ~= values * scale."""
    scale = jnp.max(jnp.abs(kernel), axis=tuple(range(n_in))) / 127
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero output channel
    return jnp.round(kernel / scale).astype(jnp.int8), scale.astype(jnp.float32)


def cast_weights(params, weights: str):
    """The Dense kernels in the `weights` type for decoding ("float32": unchanged; "bfloat16"; "int8",
    each kernel beside its "kernel_scale"). Embeddings, LayerNorm and biases stay float32: they are 1% of
    the seed model's bytes, and the embeddings are looked up, not multiplied."""
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
                out[name], out["kernel_scale"] = quantize_int8(value, dense_input_axes(names + (name,)))
        return out
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return params if weights == "float32" else cast(params, ())


def filter_logits(logits_BV, top_k, top_p):
    """Keep the top_k largest logits (0: all), then, of those, the smallest set whose probability
    reaches top_p (1: all of them). Exactly min(top_k, V) candidates survive top_k alone."""
    V = logits_BV.shape[-1]
    order_BV = jnp.argsort(-logits_BV, axis=-1)  # token ids, most likely first
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    in_top_k_V = jnp.arange(V) < jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    probs_BV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BV, -jnp.inf), axis=-1)
    # A token stays if the tokens ranked above it hold less than top_p (the first always does). The
    # top_k mask applies on its own: the probabilities of the top k may sum to 0.99999994, not 1.
    keep_sorted_BV = in_top_k_V & ((top_p >= 1.0) | (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p))
    rank_BV = jnp.argsort(order_BV, axis=-1)
    return jnp.where(jnp.take_along_axis(keep_sorted_BV, rank_BV, axis=-1), logits_BV, -jnp.inf)


def sample_tokens(logits_BV, keys_B, temperature, top_k, top_p):
    """One token per row: argmax when temperature == 0, else a draw from the filtered distribution."""
    scaled_BV = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
    # The filter sorts every row: skip it when it would keep everything (the default).
    filtered_BV = lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda l, *_: l, scaled_BV, top_k, top_p)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
    return jnp.where(temperature > 0, drawn_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


class Sampler:
    """Compiled prefill and decode for one model, batch size and chunk length."""

    def __init__(self, model_cfg: GPTConfig, params, *, batch_size: int, chunk: int = 64, shift: int | None = None,
                 prng_impl: str = "threefry2x32", weights: str = "float32", mesh=None):
        self.model_cfg, self.batch_size, self.chunk, self.prng_impl = model_cfg, batch_size, chunk, prng_impl
        self.shift = shift or max(1, model_cfg.block_size // 2)
        if not 1 <= self.shift < model_cfg.block_size:
            raise ValueError(f"shift must be in [1, block_size - 1], got {self.shift}")
        mesh = mesh or make_mesh()
        self._rep = replicated(mesh)
        # Split the batch over devices when it divides evenly; otherwise every device decodes all rows.
        self._rows = batch_sharded(mesh) if batch_size % mesh.devices.size == 0 else self._rep
        self.params = jax.device_put(cast_weights(params, weights), self._rep)
        self._prefill = jax.jit(self._prefill_fn)
        self._refill = jax.jit(self._refill_fn, donate_argnums=1)
        self._decode = jax.jit(self._decode_fn, donate_argnums=1)

    def _prefill_fn(self, params, window_BL, length, row_keys):
        cache = empty_cache(self.model_cfg, window_BL.shape[0])
        # The whole buffer in one pass; positions past `length` hold padding that is never attended
        # to (queries only see keys at or before their own position) and is overwritten later.
        logits_BLV, cache = forward_cached(self.model_cfg, params, window_BL, cache, 0)
        logits_BV = lax.dynamic_index_in_dim(logits_BLV, length - 1, axis=1, keepdims=False)
        return DecodeState(cache=cache, window_BL=window_BL, length=length, logits_BV=logits_BV,
                           row_keys=row_keys, drawn=jnp.zeros((), jnp.int32))

    def _refill_fn(self, params, state: DecodeState) -> DecodeState:
        """The buffer is full: keep its last block_size - shift tokens, prefilled again from position 0."""
        window_BL = jnp.roll(state.window_BL, -self.shift, axis=1)
        _, cache = forward_cached(self.model_cfg, params, window_BL, state.cache, 0)
        return state.replace(cache=cache, window_BL=window_BL, length=jnp.int32(self.model_cfg.block_size - self.shift))

    def _decode_fn(self, params, state: DecodeState, n_steps, temperature, top_k, top_p):
        # No refill in here: a conditional around the buffers inside the loop made XLA copy them
        # every step (10x slower at batch 16); the caller refills between chunks instead.
        def body(i, carry):
            s, out_BC = carry
            keys_B = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k, impl=self.prng_impl),
                                                           s.drawn))(s.row_keys)
            token_B = sample_tokens(s.logits_BV, keys_B, temperature, top_k, top_p)
            out_BC = lax.dynamic_update_slice(out_BC, token_B[:, None], (0, i))
            logits_B1V, cache = forward_cached(self.model_cfg, params, token_B[:, None], s.cache, s.length)
            window_BL = lax.dynamic_update_slice(s.window_BL, token_B[:, None], (0, s.length))
            s = s.replace(cache=cache, window_BL=window_BL, length=s.length + 1, logits_BV=logits_B1V[:, 0],
                          drawn=s.drawn + 1)
            return s, out_BC

        out_BC = jnp.zeros((state.window_BL.shape[0], self.chunk), jnp.int32)
        return lax.fori_loop(0, n_steps, body, (state, out_BC))

    def start(self, prompt_ids, row_keys) -> tuple[DecodeState, int]:
        """Prefill the prompt (its last block_size tokens) for every row; row_keys: (B, key) raw data.

        Returns the state and its length (filled buffer positions), which decode's caller tracks."""
        L = self.model_cfg.block_size
        prompt = np.asarray(prompt_ids, np.int32)[-L:]
        window_BL = np.zeros((self.batch_size, L), np.int32)
        window_BL[:, :len(prompt)] = prompt
        state = self._prefill(self.params, jax.device_put(window_BL, self._rows), jnp.int32(len(prompt)),
                              jax.device_put(np.asarray(row_keys), self._rows))
        return state, len(prompt)

    def refill(self, state: DecodeState) -> tuple[DecodeState, int]:
        return self._refill(self.params, state), self.model_cfg.block_size - self.shift

    def decode(self, state: DecodeState, n: int, temperature=1.0, top_k=0, top_p=1.0):
        """Draw n tokens per row, n <= chunk and n <= free buffer positions; returns (state, (B, n) NumPy)."""
        state, out_BC = self._decode(self.params, state, jnp.int32(n), jnp.float32(temperature), jnp.int32(top_k),
                                     jnp.float32(top_p))
        return state, np.asarray(out_BC)[:, :n]

    def generate(self, prompt_ids, max_new_tokens: int, row_keys, temperature=1.0, top_k=0, top_p=1.0):
        """Yield (B, n) arrays of new tokens, chunk by chunk, max_new_tokens in all."""
        L = self.model_cfg.block_size
        state, length = self.start(prompt_ids, row_keys)
        remaining = max_new_tokens
        while remaining > 0:
            if length == L:
                state, length = self.refill(state)
            n = min(remaining, self.chunk, L - length)
            state, tokens_Bn = self.decode(state, n, temperature, top_k, top_p)
            remaining -= n
            length += n
            yield tokens_Bn


def row_keys(seed: int, rows, prng_impl: str = "threefry2x32") -> np.ndarray:
    """Raw key data for the given row indices: row r of any batch draws with fold_in(key(seed), r)."""
    base = jax.random.key(seed, impl=prng_impl)
    return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(base, r))) for r in rows])
