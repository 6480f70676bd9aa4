import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# The options of issue 22, alone and combined; each changes the function the model computes.
OPTIONS = {
    "relu2": dict(mlp_activation="relu2"),
    "gelu": dict(mlp_activation="gelu"),
    "qk_norm": dict(qk_norm=True),
    "rope": dict(pos_encoding="rope"),
    "rope+qk_norm+relu2": dict(pos_encoding="rope", qk_norm=True, mlp_activation="relu2"),
    "sinusoidal+qk_norm+gelu+embd": dict(
        pos_encoding="sinusoidal", qk_norm=True, mlp_activation="gelu", attn_scale="embd"
    ),
}


def with_options(c, **options):
    return dataclasses.replace(c, **options)


@pytest.mark.parametrize("name", OPTIONS)
def test_forward_with_options_matches_numpy_reference(name):
    c = with_options(TINY, **OPTIONS[name])
    params = jax.tree.map(lambda a: a * 8 if a.ndim > 1 else a, init_params(c, jax.random.key(1)))
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (3, c.block_size))
    got = np.asarray(forward(c, params, jnp.asarray(tokens)))
    want = numpy_forward(c, params, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=1e-4)
    # The options matter at this size: the reference without them (rope: without any positions) is far.
    plain = with_options(c, mlp_activation="relu", qk_norm=False)
    plain = with_options(plain, pos_encoding="none") if c.pos_encoding == "rope" else plain
    assert np.abs(numpy_forward(plain, params, tokens) - want).max() > 0.1 * np.abs(want).max()


def hand_count(c) -> int:
    """Parameters of a GPTConfig counted by hand: embeddings, per block two LayerNorms, query/key/value
    and the output projection (with a bias), the MLP, then ln_f and lm_head."""
    D, V, F = c.n_embd, c.vocab_size, 4 * c.n_embd
    block = 2 * 2 * D + 3 * D * D + (D * D + D) + (D * F + F) + (F * D + D)
    positions = c.block_size * D if c.pos_encoding == "learned" else 0
    return V * D + positions + c.n_layer * block + 2 * D + (D * V + V)


@pytest.mark.parametrize("name", [*OPTIONS, "zero_init_proj", "gather", "seed"])
def test_parameter_shapes_and_counts(name):
    seed = GPTConfig(vocab_size=66)
    options = {"zero_init_proj": dict(zero_init_proj=True), "gather": dict(token_embedding="gather")}
    c = with_options(seed, **{**OPTIONS, **options}.get(name, {}))
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    default = jax.eval_shape(lambda: init_params(seed, jax.random.key(0)))
    assert count_params(shapes) == hand_count(c)
    if c.pos_encoding != "learned":  # no position table; everything else as the seed's
        assert "wpe" not in shapes and count_params(shapes) == 10_789_698 - 256 * 384
        default = {k: v for k, v in default.items() if k != "wpe"}
    else:
        assert count_params(shapes) == 10_789_698
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
        lambda a: (a.shape, a.dtype), default
    )


def test_zero_init_proj_makes_every_block_the_identity_at_init():
    """zero_init_proj zeroes the attention and MLP output kernels (their biases are zero already), so at
    init each block adds nothing: the logits are those of the embeddings alone, lm_head(ln_f(wte + wpe)),
    which are not uniform (lm_head is drawn as usual), so the initial loss is near ln(vocab) but not it.
    The other parameters are drawn exactly as without the option."""
    c = with_options(TINY, zero_init_proj=True)
    params, default = init_params(c, jax.random.key(5)), init_params(TINY, jax.random.key(5))
    for i in range(c.n_layer):
        block = params[f"block_{i}"]
        for kernel in (block["attn"]["proj"]["kernel"], block["mlp"]["out"]["kernel"]):
            assert kernel.shape and not np.asarray(kernel).any()
        for name in ("query", "key", "value"):
            np.testing.assert_array_equal(
                block["attn"][name]["kernel"], default[f"block_{i}"]["attn"][name]["kernel"]
            )
        np.testing.assert_array_equal(
            block["mlp"]["fc"]["kernel"], default[f"block_{i}"]["mlp"]["fc"]["kernel"]
        )
    np.testing.assert_array_equal(params["lm_head"]["kernel"], default["lm_head"]["kernel"])
    np.testing.assert_array_equal(params["wte"]["embedding"], default["wte"]["embedding"])
    tokens = np.random.default_rng(4).integers(0, c.vocab_size, (2, c.block_size))
    got = np.asarray(forward(c, params, jnp.asarray(tokens)))
    embeddings_only = numpy_forward(with_options(c, n_layer=0), params, tokens)
    np.testing.assert_allclose(got, embeddings_only, atol=1e-5, rtol=0)
    assert np.abs(got - got.mean(-1, keepdims=True)).max() > 1e-3  # not uniform logits


def test_zero_init_proj_gradients_reach_the_output_projections_first():
    """With the output kernels at zero, nothing upstream of them in a block gets a gradient at step 0
    (query, key, value and the MLP's first layer: exactly zero); the output kernels themselves do. Without
    the option every kernel does."""
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, TINY.vocab_size, (2, TINY.block_size + 1)))

    def grads(c):
        params = init_params(c, jax.random.key(7))
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            forward(c, p, tokens[:, :-1]), tokens[:, 1:]
        ).mean()
        return jax.grad(loss)(params)

    for c, upstream_zero in ((with_options(TINY, zero_init_proj=True), True), (TINY, False)):
        g = grads(c)
        for i in range(c.n_layer):
            block = g[f"block_{i}"]
            upstream = [block["attn"][n]["kernel"] for n in ("query", "key", "value")] + [
                block["mlp"]["fc"]["kernel"]
            ]
            assert all((not np.asarray(x).any()) == upstream_zero for x in upstream)
            assert (
                np.asarray(block["attn"]["proj"]["kernel"]).any()
                and np.asarray(block["mlp"]["out"]["kernel"]).any()
            )


def test_rope_scores_depend_only_on_the_position_difference():
    """q . k after rotation: shifting every position by the same offset leaves the scores unchanged; with
    the same query and key vectors at every position the scores are a function of m - n alone (equal
    along each diagonal), and that function is not constant (the rotation does something)."""
    from orpheus_jax.model import rope

    T, H, K = 12, 2, 16
    q, k = (jax.random.normal(key, (1, T, H, K)) for key in jax.random.split(jax.random.key(8), 2))
    scores = lambda q, k, first: jnp.einsum(
        "bthk,bshk->bhts", rope(q, first + jnp.arange(T)), rope(k, first + jnp.arange(T))
    )
    base = np.asarray(scores(q, k, 0))
    for first in (1, 7, 100):
        np.testing.assert_allclose(np.asarray(scores(q, k, first)), base, atol=1e-4, rtol=0)
    assert np.abs(base - np.asarray(jnp.einsum("bthk,bshk->bhts", q, k))).max() > 0.1
    # One vector repeated at every position: score(m, n) depends only on m - n.
    same_q, same_k = jnp.broadcast_to(q[:, :1], q.shape), jnp.broadcast_to(k[:, :1], k.shape)
    repeated = np.asarray(scores(same_q, same_k, 3))[0]
    for d in range(-T + 1, T):
        diagonal = np.stack([np.diagonal(repeated[h], offset=d) for h in range(H)])
        np.testing.assert_allclose(diagonal, diagonal[:, :1].repeat(diagonal.shape[1], 1), atol=1e-4, rtol=0)
    assert np.ptp(repeated[0, 0]) > 0.1  # query 0 against keys 0 .. T-1: differences 0 .. -(T-1)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned", "sinusoidal"])
def test_a_pass_at_a_later_start_changes_only_absolute_encodings(pos_encoding):
    """The model run over a chunk at positions start .. start + T - 1 (attending within the chunk), against
    NumPy at those positions: with rope the logits are those at start 0, as the scores see only position
    differences; the absolute encodings give other logits."""
    from orpheus_jax.model import GPT

    c = with_options(TINY, pos_encoding=pos_encoding, block_size=16)
    params = jax.tree.map(lambda a: a * 3 if a.ndim > 1 else a, init_params(c, jax.random.key(9)))
    tokens = np.random.default_rng(7).integers(0, c.vocab_size, (2, 6))
    at = lambda start: np.asarray(GPT(c).apply({"params": params}, jnp.asarray(tokens), start=start)[0])
    for start in (0, 5, 10):
        want = numpy_forward(c, params, tokens, start=start)
        np.testing.assert_allclose(at(start), want, atol=2e-4 * np.abs(want).max(), rtol=1e-4)
        if pos_encoding == "rope":
            np.testing.assert_allclose(at(start), at(0), atol=1e-4 * np.abs(want).max(), rtol=0)
        elif start:
            assert np.abs(at(start) - at(0)).max() > 0.1


def loss_and_grads(c, params, tokens_BW):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        forward(c, p, tokens_BW[:, :-1]), tokens_BW[:, 1:]
    ).mean()
    return jax.value_and_grad(loss)(params)


def relative_differences(a, b):
    return jax.tree.leaves(
        jax.tree.map(lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(x)), a, b)
    )


@pytest.mark.parametrize("options", [{}, OPTIONS["rope+qk_norm+relu2"]], ids=["seed", "options"])
def test_one_hot_embedding_equals_the_gather(options):
    """token_embedding "onehot" (a product with a one-hot matrix) and "gather" (a lookup): the same
    parameters (so the same checkpoints), the same logits and gradients within float32 rounding."""
    onehot = with_options(TINY, **options, token_embedding="onehot")
    gather = with_options(onehot, token_embedding="gather")
    params = init_params(onehot, jax.random.key(10))
    jax.tree.map(np.testing.assert_array_equal, params, init_params(gather, jax.random.key(10)))
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, TINY.vocab_size, (4, TINY.block_size + 1)))
    np.testing.assert_allclose(
        forward(onehot, params, tokens[:, :-1]), forward(gather, params, tokens[:, :-1]), atol=1e-6, rtol=0
    )
    (loss_1, g_1), (loss_2, g_2) = (
        loss_and_grads(onehot, params, tokens),
        loss_and_grads(gather, params, tokens),
    )
    np.testing.assert_allclose(loss_1, loss_2, rtol=1e-6)
    assert max(relative_differences(g_1, g_2)) < 1e-5
    # A token absent from the batch gets no embedding gradient either way.
    absent = sorted(set(range(TINY.vocab_size)) - set(np.asarray(tokens[:, :-1]).ravel().tolist()))
    for g in (g_1, g_2):
        assert not np.asarray(g["wte"]["embedding"])[absent].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [{}, OPTIONS["rope+qk_norm+relu2"]], ids=["seed", "options"])
def test_fused_attention_equals_ours(dtype, options):
    """attention "fused" (jax.nn.dot_product_attention; XLA's implementation on a CPU) against "xla" (our
    einsums) without dropout: the same logits and gradients in float32; in bfloat16 they differ by no
    more than bfloat16 rounding, measured as our bfloat16 pass's distance from float32 compute."""
    c = with_options(TINY, **options, dropout=0.0, dtype=dtype, attention="xla")
    fused = with_options(c, attention="fused")
    params = jax.tree.map(lambda a: a * 8 if a.ndim > 1 else a, init_params(c, jax.random.key(11)))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, c.vocab_size, (4, c.block_size + 1)))
    ours, theirs = forward(c, params, tokens[:, :-1]), forward(fused, params, tokens[:, :-1])
    (_, g_ours), (_, g_theirs) = loss_and_grads(c, params, tokens), loss_and_grads(fused, params, tokens)
    if dtype == "float32":
        logits_bound, grads_bound = 1e-5 * float(jnp.abs(ours).max()), 1e-5
    else:
        exact = with_options(c, dtype="float32")
        logits_bound = 2 * float(jnp.abs(forward(exact, params, tokens[:, :-1]) - ours).max())
        grads_bound = 2 * max(relative_differences(loss_and_grads(exact, params, tokens)[1], g_ours))
    assert float(jnp.abs(theirs - ours).max()) <= logits_bound
    assert max(relative_differences(g_ours, g_theirs)) <= grads_bound
    program = lambda c: str(jax.make_jaxpr(lambda p: forward(c, p, tokens[:, :-1]))(params))
    assert program(fused) != program(c)  # the option did take the other path
