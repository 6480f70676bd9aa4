"""Cached sampling: a fixed-size key/value buffer per layer, a blockwise prefill, a compiled decode loop.

The buffer holds block_size positions. Learned absolute positions rule out a rolling buffer, so when
it is full the sampler keeps the last block_size - shift tokens and prefills them again: shift=1 is
the seed's crop-and-recompute exactly (every token sees the last block_size tokens); a larger shift
refills less often, each token then seeing between block_size - shift and block_size tokens.

Randomness is per row and per token: row r draws its i-th new token with
fold_in(fold_in(key(seed), r), i), so a row of a batch gives the same text as a batch of one with that
row's index, and how the tokens are grouped into calls changes nothing. Everything a prompt changes
(its tokens, its length) is data, so one compilation serves every prompt for a given (batch, buffer,
chunk).

Speculative decoding (draft_len K > 0) changes nothing but speed. Each pass of the compiled loop
samples the next token as a step does, drafts K tokens after it (drafts.py: the training text and the
row's own context), runs the K + 1 tokens through the model in one pass (writing their keys and values
into the buffer) and checks the drafts: the token at each drafted position is sampled from the pass's
logits with that position's key, exactly the draw a step would make there, and the drafts are kept
while they equal those draws. The first draw that differs is not lost: it is the next pass's first
token (the state keeps the logits it was drawn from, and its key). Rows move in lockstep: every row
advances by the smallest number of drafts any row kept, which stays exact (the other rows' later
drafts are drawn again, with the same keys) and keeps one buffer length, one refill and one position
per batch; per-row positions would need per-row refills and writes, for a gain only at batch > 1,
where drafts pay least. A pass needs K + 1 free positions: the last few before the buffer fills are
plain steps, so refills happen exactly where a plain sampler's do.

What "exact" means in floating point: a pass's logits for a position equal a step's to float32
rounding, not always to the bit (XLA:CPU computes a one-row product as a matrix-vector product and
several rows as a matrix product, which sum in other orders; forcing one order slows every float32
step). A draw can differ only where two characters' scores tie within that rounding, which float32
runs have not met (benchmarks/RESULTS.md); the tests check token equality on a trained tiny run.
bfloat16 and int8 weights amplify such differences (an activation rounded to the other side of a
bfloat16 or int8 step), so their texts part from the plain sampler's sooner or later, while sampling
the same distribution.

The programs are compiled on first use; a `store` (sampler_cache.ProgramStore) keeps them for later
processes, and the model (and Flax) is imported only where a program is built.
"""

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from orpheus_jax.sharding import batch_sharded, make_mesh, replicated

FIRST_CHUNK = 8  # tokens of the first decode call, so that a stream starts at once


class DecodeState(typing.NamedTuple):
    cache: tuple  # per layer (key_NLK, value_NLK), N = batch * heads
    window_BL: jax.Array  # the tokens in the buffer, at positions 0 .. length-1
    length: jax.Array  # int32: how many positions of the buffer hold context
    logits_BV: jax.Array  # logits for the next token
    row_keys: jax.Array  # (B, key) raw key data
    drawn: jax.Array  # int32: tokens sampled so far (the fold_in index)


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


def gumbel_noise(keys_B, vocab_size: int):
    """The noise of each row's draw, (B, V): a draw is the argmax of the scaled logits plus this noise
    (the Gumbel-max trick, as jax.random.categorical draws), so the noise is known before the logits
    are, which is what lets drafts follow the draws that will check them (draft's perturb_BKV)."""
    return jax.vmap(lambda key: jax.random.gumbel(key, (vocab_size,)))(keys_B)


def draw_tokens(logits_BV, noise_BV, temperature, top_k, top_p):
    """One token per row: argmax when temperature == 0, else the draw from the filtered distribution
    that the row's noise (gumbel_noise) makes."""
    scaled_BV = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
    # The filter sorts every row: skip it when it would keep everything (the default).
    keep_all = lambda logits, *_: logits
    filtered_BV = lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, keep_all, scaled_BV, top_k, top_p)
    drawn_B = jnp.argmax(filtered_BV + noise_BV, axis=-1)
    return jnp.where(temperature > 0, drawn_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


def sample_tokens(logits_BV, keys_B, temperature, top_k, top_p):
    """One token per row, drawn with the row's key (draw_tokens)."""
    noise_BV = gumbel_noise(keys_B, logits_BV.shape[-1])
    return draw_tokens(logits_BV, noise_BV, temperature, top_k, top_p)


def token_keys(row_keys, index, prng_impl: str):
    """The key each row draws its index-th new token with."""
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k, impl=prng_impl), index))(
        row_keys
    )


def max_draft_len(block_size: int, kv_block: int) -> int:
    """The most drafts a pass may check: its K + 1 queries must read the whole buffer, as a step's do
    (fewer than an attention block, attention.attend_buffer: model.GPTConfig.attention_block), and fit."""
    return (kv_block if block_size % kv_block == 0 else block_size) - 2


# A speculative pass has costs of its own (drafting, checks, more rows in every product) that a decode
# step of a small model does not cover: measured in float32, drafting paid for the seed's 6 x 384 blocks
# and for none of the smaller shapes (benchmarks/bench_draft_cost.py, RESULTS 2026-12-05).
DRAFTING_MIN_MATMUL_PARAMS = 8_000_000


def blocks_matmul_params(n_layer: int, n_embd: int) -> int:
    """The weights of the blocks' products: 4 n_embd^2 in attention and 8 n_embd^2 in the MLP a layer."""
    return 12 * n_layer * n_embd**2


def drafting_pays(n_layer: int, n_embd: int, batch_size: int) -> bool:
    """Whether speculative decoding is the faster default: one sample at a time (rows of a batch wait for
    the slowest) of a model whose blocks' products are large enough."""
    return batch_size == 1 and blocks_matmul_params(n_layer, n_embd) >= DRAFTING_MIN_MATMUL_PARAMS


def index_signature(index) -> list | None:
    """What a compiled program depends on of a draft index: its size and text type (None: no index)."""
    if index is None:
        return None
    return [int(index["text"].shape[0]), np.dtype(index["text"].dtype).name]


class Sampler:
    """Compiled prefill (which refills too), decode and, with draft_len > 0, speculate, for one model,
    batch size and chunk length.

    draft_len: tokens drafted per speculative pass (0: none); draft_index: drafts.build_index's arrays
    of the training text, or None to draft from each row's own context alone. store: where compiled
    programs are loaded from and kept (sampler_cache.ProgramStore), or None."""

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
        draft_len: int = 0,
        draft_index=None,
        mesh=None,
        store=None,
    ):
        shift = shift or max(1, model_cfg.block_size // 2)
        if not 1 <= shift < model_cfg.block_size:
            raise ValueError(f"shift must be in [1, block_size - 1], got {shift}")
        most = max_draft_len(model_cfg.block_size, model_cfg.kv_block)
        if not 0 <= draft_len <= most:
            raise ValueError(f"draft_len must be in [0, {most}], got {draft_len}")
        settings = dict(
            batch_size=batch_size, chunk=chunk, shift=shift, prng_impl=prng_impl, weights=weights,
            block_size=model_cfg.block_size, model=dataclasses.asdict(model_cfg), draft_len=draft_len,
            draft_index=index_signature(draft_index) if draft_len else None,
        )  # fmt: skip
        self._setup(settings, mesh, store, draft_index)
        self.model_cfg = model_cfg
        self.use_params(params)

    @classmethod
    def from_settings(cls, settings: dict, params, store, mesh=None, draft_index=None) -> "Sampler":
        """A sampler whose programs come from `store` (built from settings["model"] only if one is missing);
        params already in the decoding type; draft_index: the index the settings were made with."""
        if settings.get("draft_index") != index_signature(draft_index if settings.get("draft_len") else None):
            raise ValueError("the draft index is not the one these settings were made with")
        sampler = cls.__new__(cls)
        sampler._setup(settings, mesh, store, draft_index)
        sampler.model_cfg = None
        sampler.params = jax.device_put(params, sampler._rep)
        return sampler

    def _setup(self, settings: dict, mesh, store, draft_index):
        self.settings = settings
        self.batch_size, self.chunk, self.shift = settings["batch_size"], settings["chunk"], settings["shift"]
        self.block_size, self.prng_impl = settings["block_size"], settings["prng_impl"]
        self.draft_len = settings.get("draft_len", 0)
        mesh = mesh or make_mesh()
        self._rep = replicated(mesh)
        # Split the batch over devices when it divides evenly; otherwise every device decodes all rows.
        self._rows = batch_sharded(mesh) if self.batch_size % mesh.devices.size == 0 else self._rep
        use = self.draft_len and draft_index is not None
        self._index = jax.device_put(dict(draft_index), self._rep) if use else None
        self._row_zeros = jax.device_put(np.zeros(self.batch_size, np.uint32), self._rows)  # for refills
        self._store = store
        self._compiled = {}
        # Speculative passes so far and the tokens they yielded: drafts kept per pass = tokens / passes - 1.
        self.stats = {"passes": 0, "tokens": 0}

    def programs(self) -> tuple[str, ...]:
        """The programs a generation runs (a refill runs prefill again); the first two make its first
        chunk."""
        return self.programs_for(self.settings)

    @staticmethod
    def programs_for(settings: dict) -> tuple[str, ...]:
        """programs() of a sampler with these settings."""
        return ("prefill", "decode", "speculate") if settings.get("draft_len") else ("prefill", "decode")

    def use_params(self, params) -> None:
        """Decode with these parameters from now on (float32, as trained): cast, and placed as the
        compiled programs expect them, whatever their sharding in training."""
        from orpheus_jax.model import decoding_weights

        self.params = jax.device_put(decoding_weights(params, self.settings["weights"]), self._rep)

    def has_programs(self, *names) -> bool:
        """Whether these programs are ready (compiled here or loaded from the store)."""
        self.preload(*names)  # side by side
        for name in names:
            if name not in self._compiled and self._store is not None:
                compiled = self._store.load(name)
                if compiled is not None:
                    self._compiled[name] = compiled
        return all(name in self._compiled for name in names)

    def params_fit(self, name: str) -> bool:
        """Whether the weights have the arrays, shapes and types that program `name` was compiled for."""
        expected = self._compiled[name].args_info[0][0]  # its first argument: the weights
        shape = lambda x: (tuple(x.shape), str(x.dtype))
        return jax.tree.map(shape, self.params) == jax.tree.map(shape, expected)

    def preload(self, *names) -> None:
        """Start loading these programs from the store (if kept there), beside whatever runs now."""
        if self._store is not None:
            self._store.start(*(name for name in names if name not in self._compiled))

    def _ready(self, name: str) -> bool:
        """Whether running program `name` now would not wait for its load from the store (it may
        compile: a program not kept)."""
        return name in self._compiled or self._store is None or self._store.ready(name)

    def _program(self, name: str, *args):
        """Run program `name`: compiled once per sampler (or loaded), and kept if the sampler has a store."""
        if not self.has_programs(name):
            self._compiled[name] = self._compile(name, args)
            if self._store is not None:
                self._store.save(name, self._compiled[name])
        return self._compiled[name](*args)

    def _compile(self, name: str, args):
        if self.model_cfg is None:
            from orpheus_jax.model import GPTConfig

            self.model_cfg = GPTConfig(**self.settings["model"])
        fn, donate = {  # donated: the state, whose buffers are updated in place
            "prefill": (self._prefill_fn, ()),
            "decode": (self._decode_fn, (1,)),
            "speculate": (self._speculate_fn, (2,)),
        }[name]
        # Float32 products at float32 precision on every platform: a GPU's default is TF32 (a TPU's, one
        # bfloat16 pass), with which the cached-logits tests failed on an H100 (they pass there with this).
        # bfloat16 and int8 operands are multiplied exactly in either mode.
        with jax.default_matmul_precision("highest"):
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
        if self._store is None:
            return lowered.compile()
        # An executable read from JAX's compilation cache cannot be written out again (jaxlib 0.10:
        # "Function ... not found" when a later process runs the copy): compile this one afresh. JAX
        # decides whether to use its cache once, at a process's first compilation (which may have been
        # an eager cast of int8 or bfloat16 weights), so that decision is reset around this one.
        from jax.experimental.compilation_cache import compilation_cache

        previous = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            return lowered.compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", previous)
            compilation_cache.reset_cache()

    def _prefill_fn(self, params, window_BL, length, seed, rows_B, roll):
        """A new state for the window rolled `roll` positions left (0 for a prompt; shift for a refill,
        which keeps its own keys and logits: `refill`), its positions 0 .. length-1 filled."""
        from orpheus_jax.model import empty_buffers

        window_BL = jnp.roll(window_BL, -roll, axis=1)
        cache, logits_BV = self._fill(
            params, window_BL, length, empty_buffers(self.model_cfg, window_BL.shape[0])
        )
        base = jax.random.key(seed, impl=self.prng_impl)
        row_keys = jax.vmap(lambda r: jax.random.key_data(jax.random.fold_in(base, r)))(rows_B)
        return DecodeState(
            cache=cache, window_BL=window_BL, length=length, logits_BV=logits_BV, row_keys=row_keys,
            drawn=jnp.zeros((), jnp.int32),
        )  # fmt: skip

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

    def _step(self, params, s: DecodeState, temperature, top_k, top_p):
        """One token per row, its keys and values written into the buffer: (state, tokens_B)."""
        from orpheus_jax.model import forward_cached

        token_B = sample_tokens(
            s.logits_BV, token_keys(s.row_keys, s.drawn, self.prng_impl), temperature, top_k, top_p
        )
        logits_B1V, cache = forward_cached(self.model_cfg, params, token_B[:, None], s.cache, s.length)
        window_BL = lax.dynamic_update_slice(s.window_BL, token_B[:, None], (0, s.length))
        s = s._replace(
            cache=cache,
            window_BL=window_BL,
            length=s.length + 1,
            logits_BV=logits_B1V[:, 0],
            drawn=s.drawn + 1,
        )
        return s, token_B

    def _decode_fn(self, params, state: DecodeState, n_steps, temperature, top_k, top_p):
        # No refill in here: a conditional around the buffers inside the loop made XLA copy them
        # every step (10x slower at batch 16); the caller refills between chunks instead.
        def body(i, carry):
            s, out_BC = carry
            s, token_B = self._step(params, s, temperature, top_k, top_p)
            return s, lax.dynamic_update_slice(out_BC, token_B[:, None], (0, i))

        out_BC = jnp.zeros((state.window_BL.shape[0], self.chunk), jnp.int32)
        return lax.fori_loop(0, n_steps, body, (state, out_BC))

    def _speculate_fn(self, params, index, state: DecodeState, n_target, temperature, top_k, top_p):
        """Speculative passes (see the module's docstring) while fewer than n_target tokens are out and
        K + 1 positions are free. Returns (state, tokens (B, chunk + K), [tokens out, passes])."""
        from orpheus_jax.drafts import draft
        from orpheus_jax.model import forward_cached

        K, L = self.draft_len, self.block_size
        draw = lambda logits_BV, noise_BV: draw_tokens(logits_BV, noise_BV, temperature, top_k, top_p)

        def room(carry):
            s, _, produced, _ = carry
            return (produced < n_target) & (s.length + K + 1 <= L)

        def one_pass(carry):
            s, out_BC, produced, passes = carry
            V = s.logits_BV.shape[-1]
            first_B = draw(s.logits_BV, gumbel_noise(token_keys(s.row_keys, s.drawn, self.prng_impl), V))
            window_BL = lax.dynamic_update_slice(s.window_BL, first_B[:, None], (0, s.length))
            # Draft j stands at position length + 1 + j: drawn with that position's key, as a step would.
            # Its noise is known now, so the drafts follow it: where the text's continuations are as
            # likely as the model's, the draft is the draw (at any temperature), not just the likeliest.
            keys_KB = jax.vmap(lambda j: token_keys(s.row_keys, s.drawn + 1 + j, self.prng_impl))(
                jnp.arange(K)
            )
            noise_KBV = jax.vmap(gumbel_noise, in_axes=(0, None))(keys_KB, V)
            perturb_BKV = jnp.swapaxes(noise_KBV, 0, 1) * jnp.maximum(temperature, 0.0)
            drafts_BK, _ = draft(index, window_BL, s.length + 1, K, perturb_BKV=perturb_BKV)
            tokens_BT = jnp.concatenate([first_B[:, None], drafts_BK], axis=1)  # T = K + 1
            logits_BTV, cache = forward_cached(self.model_cfg, params, tokens_BT, s.cache, s.length)
            checks_KB = jax.vmap(draw)(jnp.swapaxes(logits_BTV[:, :K], 0, 1), noise_KBV)
            kept_B = jnp.sum(jnp.cumprod(checks_KB.T == drafts_BK, axis=1), axis=1)
            kept = jnp.min(kept_B).astype(jnp.int32)  # lockstep: the rows' smallest count
            s = s._replace(
                cache=cache, window_BL=lax.dynamic_update_slice(window_BL, tokens_BT, (0, s.length)),
                length=s.length + 1 + kept, drawn=s.drawn + 1 + kept,
                logits_BV=lax.dynamic_index_in_dim(logits_BTV, kept, axis=1, keepdims=False),
            )  # fmt: skip
            # All K + 1 tokens are written; those past the kept ones are overwritten by the next pass.
            out_BC = lax.dynamic_update_slice(out_BC, tokens_BT, (0, produced))
            return s, out_BC, produced + 1 + kept, passes + 1

        out_BC = jnp.zeros((state.window_BL.shape[0], self.chunk + K), jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        state, out_BC, produced, passes = lax.while_loop(room, one_pass, (state, out_BC, zero, zero))
        return state, out_BC, jnp.stack([produced, passes])

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
            "prefill", self.params, jax.device_put(window_BL, self._rows), np.int32(len(prompt)),
            np.uint32(seed), jax.device_put(rows.astype(np.uint32), self._rows), np.int32(0),
        )  # fmt: skip
        return state, len(prompt)

    def refill(self, state: DecodeState) -> tuple[DecodeState, int]:
        """The buffer is full: keep its last block_size - shift tokens, prefilled again from position 0,
        by the prefill program (one program fewer to compile and load); the next token is still drawn
        from the logits over the whole buffer, with the state's keys."""
        kept = self.block_size - self.shift
        fresh = self._program(
            "prefill", self.params, state.window_BL, np.int32(kept), np.uint32(0), self._row_zeros,
            np.int32(self.shift),
        )  # fmt: skip
        return state._replace(cache=fresh.cache, window_BL=fresh.window_BL, length=fresh.length), kept

    def decode(self, state: DecodeState, n: int, temperature=1.0, top_k=0, top_p=1.0):
        """Draw n tokens per row, n <= chunk and n <= free buffer positions; returns (state, (B, n) NumPy)."""
        state, tokens_BC = self._dispatch_decode(state, n, temperature, top_k, top_p)
        return state, np.asarray(tokens_BC)[:, :n]

    def _dispatch_decode(self, state, n, temperature, top_k, top_p):
        """decode's call, not waited for: the tokens come back as a device array of `chunk` columns."""
        settings = (np.int32(n), np.float32(temperature), np.int32(top_k), np.float32(top_p))
        return self._program("decode", self.params, state, *settings)

    def _dispatch_speculate(self, state, n_target, temperature, top_k, top_p):
        """speculate's call, not waited for: (state, tokens (B, chunk + K) on the device, counts), at
        least n_target tokens unless the buffer fills first."""
        settings = (np.int32(n_target), np.float32(temperature), np.int32(top_k), np.float32(top_p))
        return self._program("speculate", self.params, self._index, state, *settings)

    def generate(
        self, prompt_ids, max_new_tokens: int, seed: int = 0, rows=None, temperature=1.0, top_k=0, top_p=1.0
    ):
        """Yield (B, n) NumPy arrays of new tokens, chunk by chunk, max_new_tokens in all.

        Each chunk is dispatched before the previous one is read back, so the device decodes while the
        caller prints (a caller that stops early leaves at most one chunk's work undone). A speculative
        chunk's length is known only once it has run: the host waits for that count (not the tokens)
        before dispatching the next chunk."""
        state, length = self.start(prompt_ids, seed, rows)
        remaining, pending, shown = max_new_tokens, None, False
        while remaining > 0:
            if length == self.block_size:
                state, length = self.refill(state)
            # Plain steps (the same text): short chunks until the first is shown (a first run compiles
            # speculate after that) and while a kept speculate program is still loading, and the last
            # positions before a refill, so that it falls where a plain sampler's does.
            speculating = self.draft_len and shown and self._ready("speculate")
            short = not speculating if self.draft_len else pending is None
            chunk = min(FIRST_CHUNK, self.chunk) if short else self.chunk
            if speculating and self.block_size - length > self.draft_len:
                state, tokens_BC, counts = self._dispatch_speculate(
                    state, min(remaining, chunk), temperature, top_k, top_p
                )
            else:
                n = min(remaining, chunk, self.block_size - length)
                state, tokens_BC = self._dispatch_decode(state, n, temperature, top_k, top_p)
                counts = None
            if pending is not None:
                yield np.asarray(pending[0])[:, : pending[1]]
                if not shown:  # the first characters are out: load the rest beside decoding
                    self.preload(*self.programs()[2:])
                    shown = True
            if counts is not None:
                produced, passes = (int(c) for c in np.asarray(counts))
                self.stats["passes"] += passes
                self.stats["tokens"] += produced
                n = min(produced, remaining)
                length += produced - n  # tokens past max_new_tokens: in the state, not yielded
            pending = (tokens_BC, n)
            remaining -= n
            length += n
        yield np.asarray(pending[0])[:, : pending[1]]
