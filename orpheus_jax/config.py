"""Run configuration: the keys a run needs, validated once, and saved beside the checkpoints.

Configs are `ml_collections.ConfigDict`s with flat keys (see configs/iliad_char.py for every key and
its meaning). `validate` is the only place that checks them; everything downstream trusts them.
"""

import json

import ml_collections

from orpheus_jax import OrpheusError, write_atomically

POS_ENCODINGS = ("learned", "sinusoidal")
ATTN_SCALES = ("head", "embd")
DTYPES = ("float32", "bfloat16")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
DROPOUT_RNGS = ("jax", "hash")
CPU_DOTS = ("onednn", "xla")
PARAM_SHARDINGS = ("replicated", "fsdp")
OPTIMIZERS = ("adamw", "muon")

# Keys that fix the shapes of the parameters: a checkpoint only fits a config that agrees on them.
MODEL_SHAPE_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "pos_encoding")

REQUIRED_KEYS = (
    "batch_size",
    "block_size",
    "max_iters",
    "eval_interval",
    "eval_iters",
    "learning_rate",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "seed",
    "min_lr",
    "warmup_iters",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "grad_accum_steps",
    "pos_encoding",
    "attn_scale",
    "dtype",
    "prng_impl",
    "val_fraction",
    "checkpoint_interval",
    "keep_checkpoints",
    "log_interval",
    "steps_per_call",
    "lr_decay_iters",
    "dropout_rng",
    "cpu_dots",
    "param_sharding",
    "device_data_budget",
    "optimizer",
    "muon_learning_rate",
    "muon_weight_decay",
)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise OrpheusError naming the first bad key; return None if the config is usable."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise OrpheusError(f"config is missing keys: {', '.join(missing)}")

    def check(ok, message):
        if not ok:
            raise OrpheusError(f"bad config: {message}")

    for key in (
        "batch_size",
        "block_size",
        "max_iters",
        "eval_interval",
        "eval_iters",
        "n_layer",
        "n_head",
        "n_embd",
        "grad_accum_steps",
        "checkpoint_interval",
        "keep_checkpoints",
        "log_interval",
        "steps_per_call",
    ):
        check(
            isinstance(cfg[key], int) and cfg[key] > 0, f"{key} must be a positive integer, got {cfg[key]!r}"
        )
    for key in ("warmup_iters", "lr_decay_iters", "device_data_budget"):
        check(
            isinstance(cfg[key], int) and cfg[key] >= 0,
            f"{key} must be a non-negative integer, got {cfg[key]!r}",
        )
    check(cfg.n_embd % cfg.n_head == 0, f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    check(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    check(cfg.learning_rate > 0, f"learning_rate must be positive, got {cfg.learning_rate}")
    check(0 <= cfg.min_lr <= cfg.learning_rate, f"min_lr must be in [0, learning_rate], got {cfg.min_lr}")
    check(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    check(cfg.muon_learning_rate > 0, f"muon_learning_rate must be positive, got {cfg.muon_learning_rate}")
    check(cfg.muon_weight_decay >= 0, f"muon_weight_decay must be non-negative, got {cfg.muon_weight_decay}")
    check(cfg.weight_decay >= 0, f"weight_decay must be non-negative, got {cfg.weight_decay}")
    check(
        0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1,
        f"beta1 and beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}",
    )
    check(cfg.grad_clip >= 0, f"grad_clip must be non-negative (0 turns clipping off), got {cfg.grad_clip}")
    check(0 < cfg.val_fraction < 1, f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    check(
        cfg.pos_encoding in POS_ENCODINGS,
        f"pos_encoding must be one of {POS_ENCODINGS}, got {cfg.pos_encoding!r}",
    )
    check(cfg.attn_scale in ATTN_SCALES, f"attn_scale must be one of {ATTN_SCALES}, got {cfg.attn_scale!r}")
    check(cfg.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    check(
        cfg.dropout_rng in DROPOUT_RNGS, f"dropout_rng must be one of {DROPOUT_RNGS}, got {cfg.dropout_rng!r}"
    )
    check(cfg.cpu_dots in CPU_DOTS, f"cpu_dots must be one of {CPU_DOTS}, got {cfg.cpu_dots!r}")
    check(
        cfg.param_sharding in PARAM_SHARDINGS,
        f"param_sharding must be one of {PARAM_SHARDINGS}, got {cfg.param_sharding!r}",
    )
    check(cfg.prng_impl in PRNG_IMPLS, f"prng_impl must be one of {PRNG_IMPLS}, got {cfg.prng_impl!r}")


def save(cfg: ml_collections.ConfigDict, vocab_size: int, path: str) -> None:
    write_atomically(path, json.dumps(dict(cfg.to_dict(), vocab_size=vocab_size), indent=2, sort_keys=True))


def load(path: str) -> ml_collections.ConfigDict:
    """Load a run's saved config (it carries vocab_size as well as the config's keys)."""
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise OrpheusError(f"cannot read run config {path}: {e}") from None


def shape_mismatch(saved: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, vocab_size: int) -> str:
    """Describe how `saved` differs from (cfg, vocab_size) in parameter shapes; '' if it doesn't."""
    current = dict(cfg.to_dict(), vocab_size=vocab_size)
    diffs = [f"{k} {saved.get(k)} vs {current[k]}" for k in MODEL_SHAPE_KEYS if saved.get(k) != current[k]]
    return ", ".join(diffs)
