"""Cached sampling: a fixed-size key/value buffer per layer, a blockwise prefill, a compiled decode loop.

The buffer holds block_size positions. Learned absolute positions rule out a rolling buffer, so when
it is full the sampler keeps the last block_size - shift tokens and prefills them again: shift=1 is
the seed's crop-and-recompute exactly (every token sees the last block_size tokens); a larger shift
refills less often, each token then seeing between block_size - shift and block_size tokens.

Randomness is per row: row r of any batch draws token i with fold_in(fold_in(key(seed), r), i), so a
row of a batch gives the same text as a batch of one with that row's index. Everything a prompt
changes (its tokens, its length) is data, so one compilation serves every prompt for a given
(batch, buffer, chunk).

Start-up: `Sampler.from_run` keeps the compiled programs and the parameters (in their decoding type)
in the user cache, keyed by the checkpoint, the settings, this code and jax's version. A later
process loads them without importing Flax or Orbax, tracing or compiling. The model (and Flax) is
imported only where a program is built.
"""

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import serialize_executable

from orpheus_jax import checkpoint, write_atomically
from orpheus_jax.cache import user_cache_dir
from orpheus_jax.sharding import batch_sharded, make_mesh, replicated

FIRST_CHUNK = 8  # tokens of the first decode call, so that a stream starts at once
KEEP_SAMPLERS = 8  # samplers kept in the user cache, the most recently used


class DecodeState(typing.NamedTuple):
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
    from orpheus_jax.model import dense_input_axes

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
    filtered_BV = lax.cond(
        (top_k > 0) | (top_p < 1.0), filter_logits, lambda l, *_: l, scaled_BV, top_k, top_p
    )
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
    return jnp.where(temperature > 0, drawn_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


class Sampler:
    """Compiled prefill, decode and refill for one model, batch size and chunk length.

    keep_in: (a directory, a file) where each program, once compiled, and the parameters (in their
    decoding type) are stored for `Sampler.load`."""

    def __init__(
        self,
        model_cfg,
        params,
        *,
        batch_size: int,
        chunk: int = 64,
        shift: int | None = None,
        prng_impl: str = "threefry2x32",
        weights: str = "float32",
        mesh=None,
        keep_in: tuple[str, str] | None = None,
    ):
        self.model_cfg = model_cfg
        shift = shift or max(1, model_cfg.block_size // 2)
        if not 1 <= shift < model_cfg.block_size:
            raise ValueError(f"shift must be in [1, block_size - 1], got {shift}")
        programs_dir, params_file = keep_in or (None, None)
        self._setup(
            dict(
                batch_size=batch_size,
                chunk=chunk,
                shift=shift,
                prng_impl=prng_impl,
                weights=weights,
                block_size=model_cfg.block_size,
                model=dataclasses.asdict(model_cfg),
            ),
            mesh,
            programs_dir,
        )
        self.use_params(params)
        if keep_in:
            _save_params(params_file, self.params)
            write_atomically(os.path.join(programs_dir, "settings.json"), json.dumps(self.settings))

    def _setup(self, settings: dict, mesh, programs_dir):
        self.settings = settings
        self.batch_size, self.chunk, self.shift = settings["batch_size"], settings["chunk"], settings["shift"]
        self.block_size, self.prng_impl = settings["block_size"], settings["prng_impl"]
        mesh = mesh or make_mesh()
        self._rep = replicated(mesh)
        # Split the batch over devices when it divides evenly; otherwise every device decodes all rows.
        self._rows = batch_sharded(mesh) if self.batch_size % mesh.devices.size == 0 else self._rep
        self._programs_dir = programs_dir
        self._compiled = {}

    def use_params(self, params) -> None:
        """Decode with these parameters from now on (float32, as trained): cast, and placed as the
        compiled programs expect them, whatever their sharding in training."""
        self.params = jax.device_put(cast_weights(params, self.settings["weights"]), self._rep)

    @classmethod
    def load(cls, programs_dir: str, params_file: str, mesh=None) -> "Sampler | None":
        """The sampler kept in (programs_dir, params_file), or None if they hold none (or one this process
        cannot load)."""
        try:
            with open(os.path.join(programs_dir, "settings.json")) as f:
                settings = json.load(f)
            sampler = cls.__new__(cls)
            sampler._setup(settings, mesh, programs_dir)
            sampler.model_cfg = None  # built from settings["model"] only if a program must be compiled
            for name in ("prefill", "decode"):  # refill: when first needed
                sampler._compiled[name] = _load_program(programs_dir, name)
                if sampler._compiled[name] is None:
                    return None
            sampler.params = jax.device_put(_load_params(params_file), sampler._rep)
            for path in (programs_dir, params_file):
                os.utime(path)  # recently used
            return sampler
        except Exception:  # missing, half-written or from another jaxlib: build it again
            return None

    @classmethod
    def from_run(
        cls,
        workdir: str,
        step: int,
        *,
        batch_size: int,
        chunk: int = 64,
        shift: int | None = None,
        weights: str = "float32",
        dtype: str | None = None,
        mesh=None,
    ) -> "Sampler":
        """A sampler for a run's checkpoint: loaded from the user cache when an earlier process kept one
        (programs for the same run config, settings, code and jax; parameters for the same
        checkpoint and weight type), else built from the checkpoint, and kept."""
        mesh = mesh or make_mesh()
        with open(checkpoint.config_path(workdir), "rb") as f:
            run_config = f.read().decode("utf-8", "replace")
        settings = dict(batch_size=batch_size, chunk=chunk, shift=shift, weights=weights, dtype=dtype)
        cache = os.path.join(user_cache_dir(), "samplers")
        programs_dir = os.path.join(cache, "programs", _cache_key(run_config, settings, mesh.devices.size))
        params_file = os.path.join(
            cache, "params", _cache_key(checkpoint.fingerprint(workdir, step), weights) + ".npz"
        )
        sampler = cls.load(programs_dir, params_file, mesh)
        if sampler is None:
            run = checkpoint.load_run(workdir, step)
            model_cfg = dataclasses.replace(run.model_cfg, dtype=dtype) if dtype else run.model_cfg
            os.makedirs(programs_dir, exist_ok=True)
            os.makedirs(os.path.dirname(params_file), exist_ok=True)
            for kind in ("programs", "params"):
                _evict(os.path.join(cache, kind), KEEP_SAMPLERS)
            sampler = cls(
                model_cfg,
                run.params,
                batch_size=batch_size,
                chunk=chunk,
                shift=shift,
                prng_impl=run.cfg.prng_impl,
                weights=weights,
                mesh=mesh,
                keep_in=(programs_dir, params_file),
            )
        return sampler

    def _program(self, name: str, *args):
        """Run program `name`: compiled once per sampler (or loaded), and kept if the sampler keeps."""
        if name not in self._compiled:
            compiled = _load_program(self._programs_dir, name) if self._programs_dir else None
            if compiled is None:
                compiled = self._compile(name, args)
                if self._programs_dir:
                    _save_program(self._programs_dir, name, compiled)
            self._compiled[name] = compiled
        return self._compiled[name](*args)

    def _compile(self, name: str, args):
        if self.model_cfg is None:
            from orpheus_jax.model import GPTConfig

            self.model_cfg = GPTConfig(**self.settings["model"])
        fn = {"prefill": self._prefill_fn, "decode": self._decode_fn, "refill": self._refill_fn}[name]
        donate = () if name == "prefill" else (1,)  # the state: its buffers are updated in place
        # Float32 products at float32 precision on every platform: a GPU's default is TF32 (a TPU's, one
        # bfloat16 pass), with which the cached-logits tests failed on an H100 (they pass there with this).
        # No slower on the CPU, whose float32 products are exact anyway; bfloat16 and int8 operands are
        # multiplied exactly in either mode.
        with jax.default_matmul_precision("highest"):
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
        if not self._programs_dir:
            return lowered.compile()
        # An executable read from JAX's compilation cache cannot be written out again (jaxlib 0.10:
        # "Function ... not found" when the copy runs): compile this one afresh.
        previous = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            return lowered.compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", previous)

    def _prefill_fn(self, params, window_BL, length, seed, rows_B):
        from orpheus_jax.model import empty_cache

        cache, logits_BV = self._fill(
            params, window_BL, length, empty_cache(self.model_cfg, window_BL.shape[0])
        )
        base = jax.random.key(seed, impl=self.prng_impl)
        row_keys = jax.vmap(lambda r: jax.random.key_data(jax.random.fold_in(base, r)))(rows_B)
        return DecodeState(
            cache=cache,
            window_BL=window_BL,
            length=length,
            logits_BV=logits_BV,
            row_keys=row_keys,
            drawn=jnp.zeros((), jnp.int32),
        )

    def _refill_fn(self, params, state: DecodeState) -> DecodeState:
        """The buffer is full: keep its last block_size - shift tokens, prefilled again from position 0."""
        window_BL = jnp.roll(state.window_BL, -self.shift, axis=1)
        kept = self.block_size - self.shift
        cache, _ = self._fill(params, window_BL, kept, state.cache)
        return state._replace(cache=cache, window_BL=window_BL, length=jnp.int32(kept))

    def _fill(self, params, window_BL, length, cache):
        """Run the window's positions 0 .. length-1 into the cache, one attention block of positions per
        pass, as many passes as `length` needs: a short prompt (or a refill's kept tokens) costs its
        blocks, not the whole buffer. Returns the cache and the logits at position length - 1.

        Positions past `length` in the last block hold padding: never attended to (queries see only
        keys at or before their own position) and overwritten as decoding reaches them."""
        from orpheus_jax.model import forward_cached

        c = self.model_cfg
        block = c.attention_block

        def one_block(j, carry):
            cache, logits_BV = carry
            first = j * block
            tokens_BT = lax.dynamic_slice_in_dim(window_BL, first, block, axis=1)
            logits_BTV, cache = forward_cached(c, params, tokens_BT, cache, first)
            # Only the last pass holds position length - 1; earlier ones are overwritten.
            return cache, lax.dynamic_index_in_dim(logits_BTV, length - 1 - first, axis=1, keepdims=False)

        logits_BV = jnp.zeros((window_BL.shape[0], c.vocab_size), jnp.float32)
        return lax.fori_loop(0, (length + block - 1) // block, one_block, (cache, logits_BV))

    def _decode_fn(self, params, state: DecodeState, n_steps, temperature, top_k, top_p):
        from orpheus_jax.model import forward_cached

        # No refill in here: a conditional around the buffers inside the loop made XLA copy them
        # every step (10x slower at batch 16); the caller refills between chunks instead.
        def body(i, carry):
            s, out_BC = carry
            keys_B = jax.vmap(
                lambda k: jax.random.fold_in(jax.random.wrap_key_data(k, impl=self.prng_impl), s.drawn)
            )(s.row_keys)
            token_B = sample_tokens(s.logits_BV, keys_B, temperature, top_k, top_p)
            out_BC = lax.dynamic_update_slice(out_BC, token_B[:, None], (0, i))
            logits_B1V, cache = forward_cached(self.model_cfg, params, token_B[:, None], s.cache, s.length)
            window_BL = lax.dynamic_update_slice(s.window_BL, token_B[:, None], (0, s.length))
            s = s._replace(
                cache=cache,
                window_BL=window_BL,
                length=s.length + 1,
                logits_BV=logits_B1V[:, 0],
                drawn=s.drawn + 1,
            )
            return s, out_BC

        out_BC = jnp.zeros((state.window_BL.shape[0], self.chunk), jnp.int32)
        return lax.fori_loop(0, n_steps, body, (state, out_BC))

    def start(self, prompt_ids, seed: int = 0, rows=None) -> tuple[DecodeState, int]:
        """Prefill the prompt (its last block_size tokens) for every row; rows: the row indices that pick
        each row's random stream (default 0 .. batch_size - 1).

        Returns the state and its length (filled buffer positions), which decode's caller tracks."""
        rows = np.arange(self.batch_size) if rows is None else np.asarray(rows)
        if len(rows) != self.batch_size:
            raise ValueError(f"{len(rows)} rows for a sampler of batch size {self.batch_size}")
        prompt = np.asarray(prompt_ids, np.int32)[-self.block_size :]
        window_BL = np.zeros((self.batch_size, self.block_size), np.int32)
        window_BL[:, : len(prompt)] = prompt
        state = self._program(
            "prefill",
            self.params,
            jax.device_put(window_BL, self._rows),
            np.int32(len(prompt)),
            np.uint32(seed),
            jax.device_put(rows.astype(np.uint32), self._rows),
        )
        return state, len(prompt)

    def refill(self, state: DecodeState) -> tuple[DecodeState, int]:
        return self._program("refill", self.params, state), self.block_size - self.shift

    def decode(self, state: DecodeState, n: int, temperature=1.0, top_k=0, top_p=1.0):
        """Draw n tokens per row, n <= chunk and n <= free buffer positions; returns (state, (B, n) NumPy)."""
        state, out_BC = self._program(
            "decode",
            self.params,
            state,
            np.int32(n),
            np.float32(temperature),
            np.int32(top_k),
            np.float32(top_p),
        )
        return state, np.asarray(out_BC)[:, :n]

    def generate(
        self, prompt_ids, max_new_tokens: int, seed: int = 0, rows=None, temperature=1.0, top_k=0, top_p=1.0
    ):
        """Yield (B, n) arrays of new tokens, chunk by chunk, max_new_tokens in all."""
        state, length = self.start(prompt_ids, seed, rows)
        remaining, chunk = max_new_tokens, min(FIRST_CHUNK, self.chunk)
        while remaining > 0:
            if length == self.block_size:
                state, length = self.refill(state)
            n = min(remaining, chunk, self.block_size - length)
            state, tokens_Bn = self.decode(state, n, temperature, top_k, top_p)
            remaining -= n
            length += n
            chunk = self.chunk
            yield tokens_Bn


def _cache_key(*parts) -> str:
    """A name for what depends on `parts` and on the code that computes it (this file and model.py),
    jax and the devices."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = b"".join(open(os.path.join(here, name), "rb").read() for name in ("sampler.py", "model.py"))
    device = jax.devices()[0]
    material = json.dumps(
        [
            parts,
            hashlib.sha256(code).hexdigest(),
            jax.__version__,
            jax.lib.__version__,
            device.platform,
            device.device_kind,
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _save_params(path: str, params) -> None:
    flat = {
        "/".join(p.key for p in keys): np.asarray(x)
        for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def _load_params(path: str) -> dict:
    params = {}
    with np.load(path) as saved:
        for name in saved.files:
            *parents, leaf = name.split("/")
            node = params
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = saved[name]
    return params


def _save_program(directory: str, name: str, compiled) -> None:
    # The same trust as JAX's own compilation cache: a file in the user's cache, loaded with pickle.
    tmp = os.path.join(directory, f"{name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(serialize_executable.serialize(compiled), f)
    os.replace(tmp, os.path.join(directory, f"{name}.pickle"))


def _load_program(directory: str, name: str):
    try:
        with open(os.path.join(directory, f"{name}.pickle"), "rb") as f:
            return serialize_executable.deserialize_and_load(*pickle.load(f))
    except FileNotFoundError:
        return None


def _evict(directory: str, keep: int) -> None:
    """Remove all but the `keep` most recently used entries (files or directories) of `directory`."""
    entries = sorted(os.scandir(directory), key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        if entry.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.remove(entry.path)
