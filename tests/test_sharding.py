"""FSDP: the sharding rules, and training with sharded parameters against replicated training."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from orpheus_jax.model import GPTConfig
from orpheus_jax.optim import hyperparams, make_optimizer
from orpheus_jax.sharding import fsdp_spec, make_mesh
from orpheus_jax.tokenizer import CharTokenizer
from orpheus_jax.train import init_state, make_train_step, state_shardings


@pytest.mark.parametrize(
    "shape, n, spec",
    [
        ((66, 384), 8, P(None, "data")),  # the vocabulary does not divide: the embedding dimension does
        ((384, 1536), 8, P(None, "data")),  # the largest dimension that divides
        ((384, 6, 64), 8, P("data", None, None)),
        ((384,), 8, P()),  # vectors stay whole
        ((10, 10), 8, P()),  # small
        ((66, 66), 8, P()),  # nothing divides
        ((384, 1536), 1, P(None, "data")),  # one device: "sharded" over one is whole
    ],
)
def test_fsdp_spec(shape, n, spec):
    assert fsdp_spec(shape, n) == spec


def run_steps(cfg, tokens, calls):
    """`calls` jitted calls on 8 devices; returns (losses, params and optimizer state as NumPy, the state)."""
    mesh = make_mesh()
    model_cfg = GPTConfig.from_run_config(cfg, 66)
    optimizer = make_optimizer(cfg)
    state = jax.jit(
        lambda: init_state(cfg, model_cfg, optimizer),
        out_shardings=state_shardings(cfg, model_cfg, optimizer, mesh),
    )()
    step = make_train_step(cfg, model_cfg, mesh)
    source = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P()))
    losses = []
    for _ in range(calls):
        state, metrics = step(state, source, cfg.steps_per_call, hyperparams(cfg))
        losses.extend(np.asarray(metrics["loss"]).tolist())
    return np.array(losses), jax.tree.map(np.asarray, (state.params, state.opt_state)), state


def test_fsdp_trains_like_replicated(tiny_cfg, iliad_path):
    text = open(iliad_path, encoding="utf-8").read()
    tokens = CharTokenizer.from_text(text).encode(text)
    tiny_cfg.update(steps_per_call=2, grad_accum_steps=2, dropout=0.1)
    assert len(jax.devices()) == 8
    replicated_losses, replicated_trees, _ = run_steps(tiny_cfg, tokens, 3)
    tiny_cfg.param_sharding = "fsdp"
    fsdp_losses, fsdp_trees, fsdp_state = run_steps(tiny_cfg, tokens, 3)

    np.testing.assert_allclose(fsdp_losses, replicated_losses, atol=1e-5, rtol=0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), fsdp_trees, replicated_trees
    )
    assert not np.allclose(replicated_losses[0], replicated_losses[-1])  # it did train
    # And the state was sharded: each device holds an eighth of the MLP's kernel and of its Adam moments.
    kernel = fsdp_state.params["block_0"]["mlp"]["fc"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (32, 128 // 8)
    moments = [x for x in jax.tree.leaves(fsdp_state.opt_state) if x.shape == kernel.shape]
    assert moments and all(m.addressable_shards[0].data.shape == (32, 16) for m in moments)
    assert fsdp_state.params["ln_f"]["scale"].sharding.is_fully_replicated
