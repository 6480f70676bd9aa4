import jax
import jax.numpy as jnp
import numpy as np
import optax

from orpheus_jax.model import GPTConfig, init_params
from orpheus_jax.optim import lr_schedule, make_optimizer, muon_dimensions

CFG = GPTConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8)


def first_update(cfg, params):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    optimizer = make_optimizer(cfg)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return grads, updates


def test_muon_takes_the_blocks_matrices_adamw_the_rest(tiny_cfg):
    tiny_cfg.optimizer, tiny_cfg.grad_clip, tiny_cfg.warmup_iters = "muon", 0.0, 0  # the peak rates at step 1
    params = init_params(CFG, jax.random.key(0))
    dims = {jax.tree_util.keystr(p): d for p, d in
            jax.tree_util.tree_flatten_with_path(muon_dimensions(params), is_leaf=lambda x: x is None or
                                                 isinstance(x, tuple))[0]}
    grads, updates = first_update(tiny_cfg, params)
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    grads, updates = flat(grads), flat(updates)
    muon_lr, adam_lr = float(lr_schedule(tiny_cfg, tiny_cfg.muon_learning_rate)(0)), float(lr_schedule(tiny_cfg)(0))
    for name, update in updates.items():
        if dims.get(name) is None:  # AdamW's first step: -lr * sign(gradient), with optax muon's Nesterov
            assert "block_" not in name or "kernel" not in name, name  # momentum: times 1 + b1 / (1 + b1)
            nesterov = 1 + tiny_cfg.beta1 / (1 + tiny_cfg.beta1)
            np.testing.assert_allclose(update, -adam_lr * nesterov * np.sign(grads[name]), rtol=1e-3, err_msg=name)
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
