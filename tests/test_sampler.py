import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orpheus_jax.drafts import build_index
from orpheus_jax.model import GPTConfig, decoding_weights, empty_buffers, forward, forward_cached, init_params
from orpheus_jax.sampler import Sampler, filter_logits, sample_tokens

CFG = GPTConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)
BLOCKED = dataclasses.replace(CFG, kv_block=4)  # cached attention in 4 blocks of the 16-position buffer


# The model options the cached path meets (zero_init_proj changes only the initial weights).
OPTIONS = {
    "relu2": dict(mlp_activation="relu2"),
    "gelu": dict(mlp_activation="gelu"),
    "qk_norm": dict(qk_norm=True),
    "rope": dict(pos_encoding="rope"),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rope+qk_norm+relu2": dict(pos_encoding="rope", qk_norm=True, mlp_activation="relu2"),
    "gather": dict(token_embedding="gather"),
    "fused": dict(attention="fused"),  # the full pass through jax.nn.dot_product_attention
}


@functools.cache
def scaled_params(cfg):
    """Larger than init weights: peaked, clearly ordered logits (no near-ties for greedy decoding)."""
    return jax.tree.map(lambda a: a * 4, init_params(cfg, jax.random.key(0)))


@pytest.fixture(scope="module")
def params():
    return scaled_params(CFG)


@pytest.mark.parametrize(
    "cfg, weights",
    [(CFG, "float32"), (BLOCKED, "float32"), (BLOCKED, "bfloat16"), (BLOCKED, "int8")]
    + [(dataclasses.replace(BLOCKED, **options), "float32") for options in OPTIONS.values()],
    ids=["seed", "blocked", "blocked-bfloat16", "blocked-int8", *OPTIONS],
)
def test_cached_logits_equal_full_forward_at_every_position(cfg, weights):
    params = decoding_weights(scaled_params(cfg), weights)
    rng = np.random.default_rng(0)
    for batch, prompt_len in ((2, 1), (2, 5), (1, 11)):  # batch 1: one-row products (see model.Dense)
        tokens = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)).astype(np.int32)
        full = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
        # Prefill the prompt (padded to the buffer), then feed the rest one token at a time: with
        # kv_block 4 the queries cross block boundaries at positions 4, 8 and 12.
        padded = np.where(np.arange(cfg.block_size) < prompt_len, tokens, 0)
        logits, cache = forward_cached(cfg, params, jnp.asarray(padded), empty_buffers(cfg, batch), 0)
        np.testing.assert_allclose(
            np.asarray(logits)[:, :prompt_len], full[:, :prompt_len], atol=1e-5, rtol=0
        )
        for t in range(prompt_len, cfg.block_size):
            logits, cache = forward_cached(cfg, params, jnp.asarray(tokens[:, t : t + 1]), cache, t)
            np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_cached_attention_reads_only_the_filled_blocks(params):
    """Buffer positions past the last query's block must not be read: fill them with NaN."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (1, 6)), jnp.int32)
    full = np.asarray(forward(BLOCKED, params, tokens))
    poisoned = tuple(
        (k.at[:, 8:].set(jnp.nan), v.at[:, 8:].set(jnp.nan)) for k, v in empty_buffers(BLOCKED, 1)
    )
    logits, _ = forward_cached(BLOCKED, params, tokens, poisoned, 0)  # positions 0-5: blocks 0 and 1
    np.testing.assert_allclose(np.asarray(logits), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_blockwise_prefill_and_refill_equal_the_full_pass(pos_encoding):
    """The prompt is run block by block (kv_block 4 here), as many blocks as it fills: the next-token
    logits must be the full pass's at the prompt's last position, whether it ends inside a block or
    on a block boundary; a refill keeps the last block_size - shift tokens, at positions 0 onwards
    (with rope their keys are rotated anew, for their new positions)."""
    cfg = dataclasses.replace(BLOCKED, pos_encoding=pos_encoding)
    params = scaled_params(cfg)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, cfg.block_size)).astype(np.int32)
    full = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    shift = 6
    kept = cfg.block_size - shift  # 10 tokens, in 3 blocks
    sampler = Sampler(cfg, params, batch_size=1, chunk=4, shift=shift)
    for prompt_len in (1, 3, 4, 5, 8, 13, 16):
        state, length = sampler.start(tokens[0, :prompt_len])
        assert length == prompt_len
        np.testing.assert_allclose(np.asarray(state.logits_BV)[0], full[0, prompt_len - 1], atol=1e-5, rtol=0)
    before = [np.asarray(k) for k, _ in state.cache]
    state, _ = sampler.refill(state)  # the buffer is full after the last prompt
    one_pass = jnp.asarray(np.pad(tokens[:, shift:], ((0, 0), (0, shift))))
    cache_ref = forward_cached(cfg, params, one_pass, empty_buffers(cfg, 1), 0)[1]
    for (k, v), (k_ref, v_ref), k_before in zip(state.cache, cache_ref, before):
        np.testing.assert_allclose(np.asarray(k)[:, :kept], np.asarray(k_ref)[:, :kept], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(v)[:, :kept], np.asarray(v_ref)[:, :kept], atol=1e-5, rtol=0)
        # The keys are not merely moved: a key depends on its position (through rope, or the learned
        # table added before the first layer's projection).
        assert np.abs(np.asarray(k)[:, :kept] - k_before[:, shift:]).max() > 1e-2
    assert int(state.length) == kept


@pytest.mark.parametrize("options", ["rope", "rope+qk_norm+relu2"])
def test_decoding_after_a_refill_equals_the_full_pass_of_the_kept_window(options):
    """After a refill the buffer holds the kept tokens at positions 0 onwards, where they stood at
    positions shift onwards before: each later token's logits are the full pass's over the window of
    tokens in the buffer (its positions from 0), at every step until the buffer is full again."""
    cfg = dataclasses.replace(BLOCKED, **OPTIONS[options])
    params, shift = scaled_params(cfg), 5
    sampler = Sampler(cfg, params, batch_size=2, chunk=4, shift=shift)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, cfg.block_size)
    state, length = sampler.start(prompt, rows=[0, 1])
    state, length = sampler.refill(state)
    assert length == cfg.block_size - shift
    logits = []
    for _ in range(shift):
        state, _ = sampler.decode(state, 1, temperature=1.0)  # the rows draw different tokens
        logits.append(np.asarray(state.logits_BV))
    window = np.asarray(state.window_BL)  # full again: the kept tokens, then the drawn ones
    np.testing.assert_array_equal(window[:, :length], np.tile(prompt[shift:], (2, 1)))
    assert not np.array_equal(window[0, length:], window[1, length:])
    # The full pass is causal: its logits at position t are those of the window cut after t.
    full = np.asarray(forward(cfg, params, jnp.asarray(window)))
    np.testing.assert_allclose(np.stack(logits, axis=1), full[:, length:], atol=1e-5, rtol=0)


def naive_greedy(params, prompt, n_new, cfg=CFG):
    """The seed's sampler: re-run the whole (cropped) context for every new token. The context is padded
    to block_size at its end (causal: the padding changes no logit before it), so one compilation serves."""
    last_logits = jax.jit(lambda p, tokens, n: forward(cfg, p, tokens)[0, n - 1])
    ids = list(prompt)
    for _ in range(n_new):
        context = ids[-cfg.block_size :]
        padded = jnp.asarray([context + [0] * (cfg.block_size - len(context))], jnp.int32)
        ids.append(int(jnp.argmax(last_logits(params, padded, len(context)))))
    return ids[len(prompt) :]


def cached_tokens(sampler, prompt, n_new, seed=0, rows=(0,), **settings):
    chunks = list(sampler.generate(np.asarray(prompt), n_new, seed, rows, **settings))
    return np.concatenate(chunks, axis=1)


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_greedy_with_shift_1_equals_naive_recompute(params, weights):
    prompt = [3, 1, 4, 1, 5]
    n_new = 2 * CFG.block_size
    sampler = Sampler(BLOCKED, params, batch_size=1, chunk=8, shift=1, weights=weights)
    got = cached_tokens(sampler, prompt, n_new, temperature=0.0)[0].tolist()
    assert got == naive_greedy(decoding_weights(params, weights), prompt, n_new)
    assert len(set(got)) > 3  # not a degenerate repeat of one token


def test_larger_shift_agrees_until_the_first_refill(params):
    prompt = [2, 7]
    before_refill = CFG.block_size - len(prompt) + 1  # the first refill feeds token block_size - len + 1
    greedy = cached_tokens(Sampler(CFG, params, batch_size=1, chunk=8, shift=1), prompt, 40, temperature=0.0)
    shifted = cached_tokens(Sampler(CFG, params, batch_size=1, chunk=8, shift=8), prompt, 40, temperature=0.0)
    np.testing.assert_array_equal(greedy[:, :before_refill], shifted[:, :before_refill])


def test_long_prompt_keeps_its_last_block(params):
    prompt = np.random.default_rng(1).integers(0, CFG.vocab_size, 40)
    sampler = Sampler(CFG, params, batch_size=1, chunk=8, shift=1)
    np.testing.assert_array_equal(
        cached_tokens(sampler, prompt, 10, temperature=0.0)[0],
        naive_greedy(params, prompt[-CFG.block_size :].tolist(), 10),
    )


def test_filter_top_k_and_top_p_on_hand_made_logits():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.3, 0.2]]))
    kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k), jnp.float32(p))))[
        0
    ].tolist()
    assert kept(0, 1.0) == [True, True, True, True]
    assert kept(2, 1.0) == [False, True, True, False]
    assert kept(1, 1.0) == [False, True, False, False]
    assert kept(0, 0.6) == [False, True, True, False]  # 0.4 < 0.6, 0.4 + 0.3 reaches it
    assert kept(0, 0.4) == [False, True, False, False]
    assert kept(0, 0.75) == [False, True, True, True]
    assert kept(3, 0.95) == [False, True, True, True]  # top_k first, then top_p over what is left
    assert kept(0, 1e-6) == [False, True, False, False]  # the most likely always stays


def test_draws_follow_the_filtered_distribution():
    probs = np.array([0.1, 0.4, 0.3, 0.2])
    logits = jnp.log(jnp.tile(jnp.asarray(probs, jnp.float32), (20000, 1)))
    keys = jax.random.split(jax.random.key(0), 20000)
    tokens = np.asarray(sample_tokens(logits, keys, jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0)))
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / len(tokens), probs, atol=0.015)
    tokens = np.asarray(sample_tokens(logits, keys, jnp.float32(1.0), jnp.int32(2), jnp.float32(1.0)))
    np.testing.assert_allclose(
        np.bincount(tokens, minlength=4) / len(tokens), [0, 4 / 7, 3 / 7, 0], atol=0.015
    )
    greedy = np.asarray(sample_tokens(logits, keys, jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0)))
    assert set(greedy.tolist()) == {1}


def test_a_draw_is_jax_random_categoricals_draw():
    """The sampler draws with explicit Gumbel noise (so that drafts can follow it): the same tokens as
    jax.random.categorical with the same keys, so a seed's texts are those it gave before."""
    logits = jax.random.normal(jax.random.key(1), (500, 66)) * 3
    keys = jax.random.split(jax.random.key(2), 500)
    for temperature in (0.8, 1.0):
        tokens = sample_tokens(logits, keys, jnp.float32(temperature), jnp.int32(0), jnp.float32(1.0))
        expected = jax.vmap(jax.random.categorical)(keys, logits / temperature)
        np.testing.assert_array_equal(tokens, expected)


def test_seeds_and_rows(params):
    sampler = Sampler(CFG, params, batch_size=8, chunk=8)
    rows = list(range(8))
    a = cached_tokens(sampler, [1, 2, 3], 30, seed=0, rows=rows)
    np.testing.assert_array_equal(a, cached_tokens(sampler, [1, 2, 3], 30, seed=0, rows=rows))
    assert not np.array_equal(a, cached_tokens(sampler, [1, 2, 3], 30, seed=1, rows=rows))
    assert len({tuple(r) for r in a.tolist()}) == 8  # the rows of a batch differ
    one = Sampler(CFG, params, batch_size=1, chunk=8)
    for r in (0, 5):  # each row is what a batch of one gives with that row's key
        np.testing.assert_array_equal(a[r], cached_tokens(one, [1, 2, 3], 30, seed=0, rows=[r])[0])


# jax < 0.8.1 (Colab's 0.7.2) has the unregister function below only under a private name.
if not hasattr(jax.monitoring, "unregister_event_duration_listener"):
    from jax._src import monitoring as _monitoring

    jax.monitoring.unregister_event_duration_listener = (
        _monitoring._unregister_event_duration_listener_by_callback
    )


def count_compiles():
    compiles = []
    listener = lambda event, duration, **kw: (
        compiles.append(event) if event.endswith("backend_compile_duration") else None
    )
    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def test_one_compilation_serves_every_prompt_length(params):
    compiles, stop = count_compiles()
    try:
        sampler = Sampler(CFG, params, batch_size=2, chunk=8)
        cached_tokens(sampler, [1], 20, rows=[0, 1])
        after_first = len(compiles)
        for prompt_len in (2, 7, 15, 16, 30):
            cached_tokens(
                sampler, list(range(prompt_len)), 12, rows=[0, 1], temperature=0.5, top_k=3, top_p=0.9
            )
        assert after_first > 0 and len(compiles) == after_first
    finally:
        stop()


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_every_product_of_the_programs_asks_for_full_float32_precision(params, weights):
    """On a GPU the default is TF32, which broke the cached-logits tests on an H100; a CPU multiplies
    float32 exactly either way, so what can be checked here is what each compiled program asks for."""
    plain = Sampler(CFG, params, batch_size=2, chunk=8, weights=weights)
    index = build_index(np.arange(CFG.vocab_size))
    spec = Sampler(CFG, params, batch_size=2, chunk=8, weights=weights, draft_len=3, draft_index=index)
    for sampler in (plain, spec):
        cached_tokens(sampler, [1, 2, 3], 20, rows=[0, 1])  # prefill (a refill too), decode or speculate
        for name in sampler.programs():
            text = sampler._compiled[name].as_text()
            dots = [line for line in text.splitlines() if re.search(r"= \S+ dot\(", line)]
            assert dots and all("operand_precision={highest,highest}" in line for line in dots), name


@pytest.mark.parametrize("top_k", [1, 2, 5, 20, 65])
def test_top_k_keeps_exactly_k_candidates_on_random_logits(top_k):
    """With top_p = 1 the top-k mask alone decides: the k largest logits of every row, no more.
    (The probabilities of the top k rarely sum to exactly 1.0 in float32.)"""
    logits = jax.random.normal(jax.random.key(top_k), (2000, 66)) * 3
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.int32(top_k), jnp.float32(1.0))))
    assert (kept.sum(axis=1) == top_k).all()
    np.testing.assert_array_equal(
        np.sort(np.where(kept, np.asarray(logits), -np.inf), axis=1)[:, -top_k:],
        np.sort(np.asarray(logits), axis=1)[:, -top_k:],
    )
    everything = np.isfinite(np.asarray(filter_logits(logits, jnp.int32(0), jnp.float32(1.0))))
    assert everything.all()


def test_top_k_draws_stay_in_the_top_k_of_model_logits(params):
    sampler = Sampler(CFG, params, batch_size=4, chunk=8, shift=1)
    prompt = [1, 2, 3]
    tokens = cached_tokens(sampler, prompt, 40, rows=range(4), temperature=1.5, top_k=2)
    last_logits = jax.jit(lambda tokens, n: forward(CFG, params, tokens)[0, n - 1])
    for row in tokens:  # each drawn token ranks first or second under the full forward of its context
        ids = list(prompt)
        for t in row:
            context = ids[-CFG.block_size :]
            padded = jnp.asarray([context + [0] * (CFG.block_size - len(context))])  # causal: padding after
            assert t in np.argsort(-np.asarray(last_logits(padded, len(context))))[:2]
            ids.append(int(t))
