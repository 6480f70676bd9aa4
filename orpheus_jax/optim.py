"""AdamW with the seed-era recipe: warmup + cosine decay, global-norm clipping, no decay on
biases, LayerNorm parameters and embeddings."""
import jax
import optax


def lr_schedule(cfg) -> optax.Schedule:
    """The learning rate of update i (0-based): linear warmup to learning_rate over warmup_iters,
    cosine decay to min_lr at lr_decay_iters (0: at max_iters), then flat.

    Update i takes the curve's value at i + 1, so the first update moves (lr / warmup_iters, as
    nanoGPT's lr * (i + 1) / warmup) and the update that brings the run to step s has lr(s)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    curve = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_iters else cfg.learning_rate, peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters, decay_steps=max(decay_iters, cfg.warmup_iters + 1), end_value=cfg.min_lr)
    return lambda i: curve(i + 1)


def decay_mask(params):
    """Decay only matrices that multiply activations: every Dense 'kernel'."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    # Same state structure with clipping on or off, so a resumed run may change grad_clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
