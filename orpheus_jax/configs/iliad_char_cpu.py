"""CPU preset: the seed's architecture scaled down, with the options that learn most per token on a
2-core machine (RoPE, ReLU², QK-norm, Muon), to train in about 5 minutes there."""

from orpheus_jax.configs import iliad_char


def get_config():
    c = iliad_char.get_config()
    c.n_layer = 4
    c.n_head = 4
    c.n_embd = 128
    c.block_size = 128
    c.batch_size = 32
    # 10 minutes is about 10 passes over the text for 0.8M parameters: little overfitting; 30% faster steps.
    c.dropout = 0.0
    # Options that learn more per token (benchmarks/RESULTS.md, issue 22): fewer steps to the same loss.
    c.pos_encoding = "rope"
    c.mlp_activation = "relu2"
    c.qk_norm = True
    c.optimizer = "muon"
    c.muon_learning_rate = 0.04
    c.max_iters = 1200
    c.learning_rate = 2e-3
    c.min_lr = 2e-4
    c.warmup_iters = 100
    c.eval_interval = 250
    c.eval_iters = 20
    c.checkpoint_interval = 500
    return c
