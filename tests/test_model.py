import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import numpy_forward

from orpheus_jax.model import GPTConfig, count_params, forward, init_params

TINY = GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8, dropout=0.1)


def test_seed_config_has_the_seeds_parameter_count():
    shapes = jax.eval_shape(lambda: init_params(GPTConfig(vocab_size=66), jax.random.key(0)))
    assert count_params(shapes) == 10_789_698


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("attn_scale", ["head", "embd"])
def test_forward_matches_numpy_reference(pos_encoding, attn_scale):
    c = GPTConfig(**{**TINY.__dict__, "pos_encoding": pos_encoding, "attn_scale": attn_scale})
    params = init_params(c, jax.random.key(1))
    # Larger than init weights so that a wrong scale or mask shows clearly.
    params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, params)
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (3, c.block_size))
    got = forward(c, params, jnp.asarray(tokens))
    np.testing.assert_allclose(got, numpy_forward(c, params, tokens), atol=2e-4, rtol=1e-4)


def test_causality():
    params = init_params(TINY, jax.random.key(2))
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (1, TINY.block_size))
    t = 5
    changed = tokens.copy()
    changed[0, t] = (changed[0, t] + 1) % TINY.vocab_size
    a, b = forward(TINY, params, jnp.asarray(tokens)), forward(TINY, params, jnp.asarray(changed))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_dropout_only_when_not_deterministic():
    params = init_params(TINY, jax.random.key(3))
    tokens = jnp.zeros((2, TINY.block_size), jnp.int32)
    det = forward(TINY, params, tokens)
    np.testing.assert_array_equal(det, forward(TINY, params, tokens, jax.random.key(9), deterministic=True))
    a = forward(TINY, params, tokens, jax.random.key(9), deterministic=False)
    b = forward(TINY, params, tokens, jax.random.key(10), deterministic=False)
    assert not np.allclose(a, det) and not np.allclose(a, b)


@pytest.mark.parametrize("dropout_rng", ["jax", "hash"])
def test_dropout_masks_have_the_right_rate_and_vary(dropout_rng):
    from orpheus_jax.model import Dropout

    x = jnp.ones((64, 6, 64, 64))
    drop = lambda seed: Dropout(0.2, dropout_rng).apply(
        {}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    )
    a, b = np.asarray(drop(0)), np.asarray(drop(1))
    assert set(np.unique(a).tolist()) == {0.0, 1.25}  # inverted dropout: kept values scaled by 1/0.8
    assert abs((a == 0).mean() - 0.2) < 0.002 and abs((b == 0).mean() - 0.2) < 0.002
    assert abs(((a == 0) & (b == 0)).mean() - 0.04) < 0.002  # masks of two keys independent
    assert abs(((a[..., 1:] == 0) & (a[..., :-1] == 0)).mean() - 0.04) < 0.002  # neighbours too,
    assert abs(((a[..., 1:, :] == 0) & (a[..., :-1, :] == 0)).mean() - 0.04) < 0.002  # along every axis
    assert abs(((a[1:] == 0) & (a[:-1] == 0)).mean() - 0.04) < 0.002
    np.testing.assert_array_equal(a, np.asarray(drop(0)))


def test_bfloat16_compute_keeps_float32_params():
    c = GPTConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
    params = init_params(c, jax.random.key(4))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, c.vocab_size, (2, c.block_size)))
    low, full = forward(c, params, tokens), forward(TINY, params, tokens)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, full, atol=0.05)


def test_bfloat16_gradients_stay_close_to_float32(iliad_path):
    """bf16 compute keeps in float32 what accumulates error: the embeddings (whose gradients sum over
    every position), the residual stream, attention scores, logits and the bias sums of the Dense layers
    that feed them. Every gradient then stays within a few percent of float32's (lm_head's bias was
    26% off with the lookups and logits in bf16)."""
    import optax

    text = open(iliad_path, encoding="utf-8").read()
    chars = sorted(set(text))
    ids = np.array([chars.index(ch) for ch in text[:100_000]])
    c32 = GPTConfig(vocab_size=66, n_layer=2, n_head=4, n_embd=128, block_size=64, dropout=0.0)
    c16 = GPTConfig(**{**c32.__dict__, "dtype": "bfloat16"})
    params = init_params(c32, jax.random.key(0))
    starts = np.random.default_rng(0).integers(0, len(ids) - 65, 32)
    window = np.stack([ids[s : s + 65] for s in starts])
    x, y = jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])
    grad = lambda c: jax.jit(
        jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(c, p, x), y).mean())
    )(params)
    g32, g16 = grad(c32), grad(c16)
    assert {a.dtype for a in jax.tree.leaves(g16)} == {jnp.dtype("float32")}
    rel = jax.tree.map(lambda a, b: float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a)), g32, g16)
    assert max(jax.tree.leaves(rel)) < 0.04, rel
    assert rel["wte"]["embedding"] < 0.02 and rel["lm_head"]["bias"] < 0.02
