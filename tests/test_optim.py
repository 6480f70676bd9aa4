import jax
import numpy as np

from orpheus_jax.model import GPTConfig
from orpheus_jax.optim import lr_schedule, make_optimizer
from orpheus_jax.train import init_state


def test_warmup_starts_above_zero_and_reaches_the_peak(tiny_cfg):
    tiny_cfg.update(learning_rate=1e-3, min_lr=1e-4, warmup_iters=5, max_iters=20, lr_decay_iters=0)
    lr = lr_schedule(tiny_cfg)
    # Update i uses lr * (i + 1) / warmup, as nanoGPT: the first update is not wasted at lr 0.
    np.testing.assert_allclose([float(lr(i)) for i in range(5)], [2e-4, 4e-4, 6e-4, 8e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(float(lr(19)), 1e-4, rtol=1e-6)  # the update that ends the run: min_lr
    assert all(float(lr(i)) >= float(lr(i + 1)) for i in range(4, 30))


def test_the_first_update_moves_the_parameters(tiny_cfg):
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    optimizer = make_optimizer(tiny_cfg)
    state = init_state(tiny_cfg, model_cfg, optimizer)
    grads = jax.tree.map(lambda p: np.ones_like(p), state.params)
    updates, _ = optimizer.update(grads, state.opt_state, state.params)
    assert all(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(updates))


def test_no_decay_on_biases_layernorm_and_embeddings(tiny_cfg):
    """With zero gradients only weight decay moves parameters: exactly the Dense kernels."""
    tiny_cfg.update(warmup_iters=0, weight_decay=0.5, grad_clip=0.0)
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    optimizer = make_optimizer(tiny_cfg)
    state = init_state(tiny_cfg, model_cfg, optimizer)
    updates, _ = optimizer.update(jax.tree.map(np.zeros_like, state.params), state.opt_state, state.params)
    moved = jax.tree_util.tree_map_with_path(lambda path, u: (path[-1].key, bool(np.abs(u).max() > 0)), updates)
    for name, did_move in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
        assert did_move == (name == "kernel"), name
