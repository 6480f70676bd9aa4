"""A model small enough for tests: a few seconds on a CPU."""

from orpheus_jax.configs import iliad_char


def get_config():
    c = iliad_char.get_config()
    c.n_layer = 2
    c.n_head = 2
    c.n_embd = 32
    c.block_size = 32
    c.batch_size = 8
    c.dropout = 0.1
    c.max_iters = 20
    c.learning_rate = 1e-3
    c.min_lr = 1e-4
    c.warmup_iters = 5
    c.eval_interval = 10
    c.eval_iters = 2
    c.log_interval = 5
    c.steps_per_call = 1  # tests count steps one call at a time unless they ask for more
    c.checkpoint_interval = 10
    c.cpu_dots = "xla"  # compiled programs the persistent cache can keep: tests reuse them
    return c
