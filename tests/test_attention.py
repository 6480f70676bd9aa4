"""The attention implementations against each other inside the model: "pallas" (our kernel, in Pallas'
interpreter on the CPU) against "xla" (our einsums), with the same hash dropout masks, for the logits and
the gradients, and through a sharded train step on 8 devices."""

import dataclasses

import jax
import numpy as np
import pytest

from orpheus_jax.model import GPTConfig, forward, init_params

CFG = GPTConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.2)


@pytest.mark.parametrize("deterministic", [True, False])
def test_pallas_attention_equals_ours_logits_and_gradients(deterministic):
    params = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, CFG.block_size), 0, CFG.vocab_size)
    rng = jax.random.key(2)

    def loss(cfg, params):
        return forward(cfg, params, tokens, rng, deterministic).mean()

    results = {}
    for impl in ("xla", "pallas"):
        cfg = dataclasses.replace(CFG, attention=impl)
        logits = forward(cfg, params, tokens, rng, deterministic)
        results[impl] = (
            np.asarray(logits),
            jax.tree.map(np.asarray, jax.grad(lambda p, cfg=cfg: loss(cfg, p))(params)),
        )
    np.testing.assert_allclose(results["pallas"][0], results["xla"][0], atol=2e-5, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4),
        results["pallas"][1],
        results["xla"][1],
    )
    if not deterministic:  # dropout was on: its masks differ from no dropout's, so they were applied
        undropped = np.asarray(forward(CFG, params, tokens))
        assert np.abs(results["pallas"][0] - undropped).max() > 1e-3


@pytest.mark.slow
def test_pallas_trains_like_xla_on_eight_devices(tiny_cfg, small_text_path, tmp_path):
    from orpheus_jax.train import train

    tiny_cfg.update(max_iters=3, eval_interval=3, checkpoint_interval=3, dropout=0.2, cpu_dots="xla")
    states = {}
    for impl in ("xla", "pallas"):
        tiny_cfg.attention = impl
        states[impl] = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / impl), small_text_path)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6),
        states["pallas"].params,
        states["xla"].params,
    )
