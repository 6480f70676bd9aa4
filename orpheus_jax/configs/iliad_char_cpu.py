"""CPU preset: the seed's architecture scaled to train in about 10 minutes on a 2-core machine."""

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
    c.max_iters = 2500
    c.learning_rate = 2e-3
    c.min_lr = 2e-4
    c.warmup_iters = 100
    c.eval_interval = 250
    c.eval_iters = 20
    c.checkpoint_interval = 500
    return c
