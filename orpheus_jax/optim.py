"""Optimizers: AdamW with the seed-era recipe (warmup + cosine decay, global-norm clipping, no decay
on biases, LayerNorm parameters and embeddings), or Muon for the hidden matrices with AdamW for the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers, muon

from orpheus_jax.model import dense_input_axes


def hyperparams(cfg) -> dict[str, np.float32]:
    """The optimizer's numbers, inputs of the compiled train step rather than constants in it: a run
    that changes one (another learning rate, a longer run) reuses the step from the compilation cache.

    min_lr_ratio is min_lr / learning_rate (both schedules end at their peak times it); decay_iters is
    where the cosine ends (lr_decay_iters, else max_iters). Whether clipping and weight decay are on at
    all is the config's (make_optimizer): off, they are no operations in the step, not a zero."""
    numbers = {
        "learning_rate": cfg.learning_rate,
        "muon_learning_rate": cfg.muon_learning_rate,
        "min_lr_ratio": cfg.min_lr / cfg.learning_rate,
        "warmup_iters": cfg.warmup_iters,
        "decay_iters": max(cfg.lr_decay_iters or cfg.max_iters, cfg.warmup_iters + 1),
        "weight_decay": cfg.weight_decay,
        "muon_weight_decay": cfg.muon_weight_decay,
        "grad_clip": cfg.grad_clip,
        "ema_decay": cfg.ema_decay,
    }
    return {k: np.float32(v) for k, v in numbers.items()}


def lr_schedule(hp: dict, peak: str = "learning_rate") -> optax.Schedule:
    """The learning rate of update i (0-based), from hyperparams: linear warmup to hp[peak] over
    warmup_iters, cosine decay to min_lr_ratio * hp[peak] at decay_iters, then flat.

    Update i takes the curve's value at i + 1, so the first update moves (lr / warmup_iters, as
    nanoGPT's lr * (i + 1) / warmup) and the update that brings the run to step s has lr(s)."""
    top, warmup, decay = hp[peak], hp["warmup_iters"], hp["decay_iters"]
    floor = top * hp["min_lr_ratio"]

    def lr(i):
        t = jnp.asarray(i, jnp.float32) + 1
        progress = jnp.clip((t - warmup) / (decay - warmup), 0, 1)
        cosine = floor + (top - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warmup, top * t / jnp.maximum(warmup, 1), cosine)

    return lr


def decay_mask(params):
    """Decay only matrices that multiply activations: every Dense 'kernel'."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def muon_dimensions(params):
    """Which axes of each hidden matrix Muon orthogonalizes over (input, output); None: AdamW's.

    The transformer blocks' kernels are Muon's; embeddings, LayerNorm, biases and lm_head stay with
    AdamW, as in modded-nanogpt."""

    def dims(path, x):
        names = [p.key for p in path]
        if names[-1] != "kernel" or not names[0].startswith("block_"):
            return None
        n_in = dense_input_axes(names)
        return MuonDimensionNumbers(tuple(range(n_in)), tuple(range(n_in, x.ndim)))

    return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(cfg, hp: dict | None = None) -> optax.GradientTransformation:
    """cfg's optimizer with the numbers hp (default: hyperparams(cfg)); inside the train step hp is the
    step's input. The state's structure depends on cfg alone, so any hp updates the same state."""
    hp = hyperparams(cfg) if hp is None else hp
    if cfg.optimizer == "muon":
        # Muon's weight decay is scaled by its own (larger) learning rate, as optax does it.
        update = muon(
            lr_schedule(hp, "muon_learning_rate"),
            weight_decay=hp["muon_weight_decay"] if cfg.muon_weight_decay else 0.0,
            adam_learning_rate=lr_schedule(hp),
            adam_b1=cfg.beta1,
            adam_b2=cfg.beta2,
            muon_weight_dimension_numbers=muon_dimensions,
        )
    else:
        update = optax.adamw(
            lr_schedule(hp),
            b1=cfg.beta1,
            b2=cfg.beta2,
            weight_decay=hp["weight_decay"] if cfg.weight_decay else 0.0,
            mask=decay_mask,
        )
    # Same state structure with clipping on or off, so a resumed run may change grad_clip.
    clip = optax.clip_by_global_norm(hp["grad_clip"]) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, update)
