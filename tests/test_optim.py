"""The optimizer chains against independent references: optax's own Adam, PyTorch's Adam formula in
NumPy, nanoGPT's warmup formula, SVDs of Muon's updates."""

import jax
import numpy as np
import optax
import pytest

from configs import orpheus_seed
from orpheus_jax.model import GPTConfig, init_params
from orpheus_jax.optim import hyperparams, lr_schedule, make_optimizer, muon_dimensions
from orpheus_jax.train import init_state

CFG = GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8)


def torch_adam_numpy(params, grads_seq, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam's default update (torch/optim/adam.py, single-tensor path), leaf by leaf."""
    out = []
    for p in params:
        p, m, v = p.astype(np.float64), np.zeros_like(p, np.float64), np.zeros_like(p, np.float64)
        out.append([p, m, v])
    for t, grads in enumerate(grads_seq, start=1):
        for state, g in zip(out, grads):
            p, m, v = state
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = np.sqrt(v) / np.sqrt(1 - b2**t) + eps
            state[:] = [p - lr / (1 - b1**t) * m / denom, m, v]
    return [s[0] for s in out]


def test_seed_recipe_is_adam_with_torch_defaults():
    cfg = orpheus_seed.get_config()
    params = init_params(
        GPTConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=4), jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    grads_seq = [
        jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 10 ** rng.uniform(-4, 1), params)
        for _ in range(6)
    ]
    ours, ref = make_optimizer(cfg), optax.adam(1e-3)  # optax.adam: b1 0.9, b2 0.999, eps 1e-8

    @jax.jit
    def steps(params):
        p_ours, s_ours, p_ref, s_ref = params, ours.init(params), params, ref.init(params)
        for grads in grads_seq:
            u, s_ours = ours.update(grads, s_ours, p_ours)
            p_ours = optax.apply_updates(p_ours, u)
            u, s_ref = ref.update(grads, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u)
        return p_ours, p_ref

    p_ours, p_ref = steps(params)
    leaves = jax.tree.leaves(p_ours)
    for a, b in zip(leaves, jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    torch_like = torch_adam_numpy(
        [np.asarray(x) for x in jax.tree.leaves(params)],
        [[np.asarray(g) for g in jax.tree.leaves(gs)] for gs in grads_seq],
    )
    for a, b in zip(leaves, torch_like):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-6)
    moved = sum(
        float(np.abs(np.asarray(a) - np.asarray(p)).max()) for a, p in zip(leaves, jax.tree.leaves(params))
    )
    assert moved > 1e-3  # the updates were applied (Adam moves each weight by about lr per step)


def test_seed_recipe_learning_rate_is_constant():
    cfg = orpheus_seed.get_config()
    schedule = lr_schedule(hyperparams(cfg))
    assert [float(schedule(i)) for i in (0, 1, 100, 2500, 4999, 5000, 9000)] == [np.float32(1e-3)] * 7


def test_warmup_starts_above_zero_and_reaches_the_peak(tiny_cfg):
    tiny_cfg.update(learning_rate=1e-3, min_lr=1e-4, warmup_iters=5, max_iters=20, lr_decay_iters=0)
    lr = lr_schedule(hyperparams(tiny_cfg))
    # Update i uses lr * (i + 1) / warmup, as nanoGPT: the first update is not wasted at lr 0.
    np.testing.assert_allclose([float(lr(i)) for i in range(5)], [2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(float(lr(19)), 1e-4, rtol=1e-6)  # the update that ends the run: min_lr
    assert all(float(lr(i)) >= float(lr(i + 1)) for i in range(4, 30))


@pytest.mark.parametrize(
    "settings",
    [
        dict(warmup_iters=5, max_iters=20, lr_decay_iters=0),  # decay ends with the run
        dict(warmup_iters=0, max_iters=100, lr_decay_iters=60),  # then flat at min_lr
        dict(warmup_iters=30, max_iters=20, lr_decay_iters=0),  # a run shorter than its warmup
    ],
)
def test_the_schedule_is_optaxs_warmup_cosine_one_update_ahead(tiny_cfg, settings):
    tiny_cfg.update(learning_rate=2e-3, min_lr=1e-4, **settings)
    decay_iters = tiny_cfg.lr_decay_iters or tiny_cfg.max_iters
    reference = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if tiny_cfg.warmup_iters else 2e-3,
        peak_value=2e-3,
        warmup_steps=tiny_cfg.warmup_iters,
        decay_steps=max(decay_iters, tiny_cfg.warmup_iters + 1),
        end_value=1e-4,
    )
    updates = np.arange(120)
    np.testing.assert_allclose(
        jax.vmap(lr_schedule(hyperparams(tiny_cfg)))(updates), reference(updates + 1), rtol=2e-6, atol=1e-10
    )


def test_the_first_update_moves_the_parameters(tiny_cfg):
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    optimizer = make_optimizer(tiny_cfg)
    state = jax.jit(lambda: init_state(tiny_cfg, model_cfg, optimizer))()
    grads = jax.tree.map(lambda p: np.ones_like(p), state.params)
    updates = jax.jit(lambda g, s: optimizer.update(g, s.opt_state, s.params)[0])(grads, state)
    assert all(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(updates))


def test_no_decay_on_biases_layernorm_and_embeddings(tiny_cfg):
    """With zero gradients only weight decay moves parameters: exactly the Dense kernels."""
    tiny_cfg.update(warmup_iters=0, weight_decay=0.5, grad_clip=0.0)
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    optimizer = make_optimizer(tiny_cfg)
    state = init_state(tiny_cfg, model_cfg, optimizer)
    updates, _ = optimizer.update(jax.tree.map(np.zeros_like, state.params), state.opt_state, state.params)
    moved = jax.tree_util.tree_map_with_path(
        lambda path, u: (path[-1].key, bool(np.abs(u).max() > 0)), updates
    )
    for name, did_move in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
        assert did_move == (name == "kernel"), name


def first_update(cfg, params):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    optimizer = make_optimizer(cfg)
    updates = jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p)[0])(grads, params)
    return grads, updates


def test_muon_takes_the_blocks_matrices_adamw_the_rest(tiny_cfg):
    tiny_cfg.optimizer, tiny_cfg.grad_clip, tiny_cfg.warmup_iters = "muon", 0.0, 0  # the peak rates at step 1
    params = init_params(CFG, jax.random.key(0))
    dims = {
        jax.tree_util.keystr(p): d
        for p, d in jax.tree_util.tree_flatten_with_path(
            muon_dimensions(params), is_leaf=lambda x: x is None or isinstance(x, tuple)
        )[0]
    }
    grads, updates = first_update(tiny_cfg, params)
    flat = lambda tree: {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    grads, updates = flat(grads), flat(updates)
    muon_lr, adam_lr = (
        float(lr_schedule(hyperparams(tiny_cfg), "muon_learning_rate")(0)),
        float(lr_schedule(hyperparams(tiny_cfg))(0)),
    )
    for name, update in updates.items():
        if dims.get(name) is None:  # AdamW's first step: -lr * sign(gradient), with optax muon's Nesterov
            assert "block_" not in name or "kernel" not in name, name  # momentum: times 1 + b1 / (1 + b1)
            nesterov = 1 + tiny_cfg.beta1 / (1 + tiny_cfg.beta1)
            np.testing.assert_allclose(
                update, -adam_lr * nesterov * np.sign(grads[name]), rtol=1e-3, err_msg=name
            )
        else:  # Muon: the gradient orthogonalized over (input axes, output axes): equal singular values
            n_in = len(dims[name].reduction_axis)
            matrix = update.reshape(int(np.prod(update.shape[:n_in])), -1)
            singular = np.linalg.svd(matrix, compute_uv=False)
            assert "block_" in name and name.endswith("['kernel']"), name
            # Newton-Schulz maps them into about 0.68 .. 1.13 (a Gaussian 16 x 16 matrix: a ratio of 100s).
            assert singular.max() / singular.min() < 1.8, (name, singular)
            scale = max(1.0, matrix.shape[1] / matrix.shape[0]) ** 0.5  # optax's width scaling
            assert 0.5 < singular.mean() / (muon_lr * scale) < 1.3, name
    proj = [n for n in dims if "proj" in n and "kernel" in n]
    assert proj and all(dims[n].reduction_axis == (0, 1) for n in proj)  # (heads, head size) in, n_embd out
