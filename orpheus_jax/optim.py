"""Optimizers: AdamW with the seed-era recipe (warmup + cosine decay, global-norm clipping, no decay
on biases, LayerNorm parameters and embeddings), or Muon for the hidden matrices with AdamW for the rest."""

import jax
import optax
from optax.contrib import MuonDimensionNumbers, muon

from orpheus_jax.model import dense_input_axes


def lr_schedule(cfg, peak: float | None = None) -> optax.Schedule:
    """The learning rate of update i (0-based): linear warmup to `peak` (default learning_rate) over
    warmup_iters, cosine decay to min_lr * peak / learning_rate at lr_decay_iters (0: at max_iters),
    then flat.

    Update i takes the curve's value at i + 1, so the first update moves (lr / warmup_iters, as
    nanoGPT's lr * (i + 1) / warmup) and the update that brings the run to step s has lr(s)."""
    peak = cfg.learning_rate if peak is None else peak
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    curve = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if cfg.warmup_iters else peak,
        peak_value=peak,
        warmup_steps=cfg.warmup_iters,
        decay_steps=max(decay_iters, cfg.warmup_iters + 1),
        end_value=cfg.min_lr * peak / cfg.learning_rate,
    )
    return lambda i: curve(i + 1)


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


def make_optimizer(cfg) -> optax.GradientTransformation:
    if cfg.optimizer == "muon":
        # Muon's weight decay is scaled by its own (larger) learning rate, as optax does it.
        update = muon(
            lr_schedule(cfg, cfg.muon_learning_rate),
            weight_decay=cfg.muon_weight_decay,
            adam_learning_rate=lr_schedule(cfg),
            adam_b1=cfg.beta1,
            adam_b2=cfg.beta2,
            muon_weight_dimension_numbers=muon_dimensions,
        )
    else:
        update = optax.adamw(
            lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    # Same state structure with clipping on or off, so a resumed run may change grad_clip.
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, update)
