"""Run configuration: the keys a run needs, validated once, and saved beside the checkpoints.

Configs are `ml_collections.ConfigDict`s with flat keys (configs/iliad_char.py lists every key and its
meaning). `validate` is the only place that checks them; everything downstream trusts them.
"""

import json

import ml_collections

from orpheus_jax import OrpheusError
from orpheus_jax.fileio import write_atomically

CHOICES = {
    "pos_encoding": ("learned", "sinusoidal", "rope"),
    "attn_scale": ("head", "embd"),
    "dtype": ("float32", "bfloat16"),
    "prng_impl": ("threefry2x32", "rbg", "unsafe_rbg"),
    "dropout_rng": ("jax", "hash"),
    "cpu_dots": ("onednn", "xla"),
    "param_sharding": ("replicated", "fsdp"),
    "optimizer": ("adamw", "muon"),
    "mlp_activation": ("relu", "relu2", "gelu"),
    "attention": ("auto", "xla", "fused", "pallas"),
    "token_embedding": ("onehot", "gather"),
}
POSITIVE_INTS = (
    "batch_size", "block_size", "max_iters", "eval_interval", "eval_iters", "n_layer", "n_head", "n_embd",
    "grad_accum_steps", "checkpoint_interval", "keep_checkpoints", "log_interval", "steps_per_call",
)  # fmt: skip
NON_NEGATIVE_INTS = ("warmup_iters", "lr_decay_iters", "device_data_budget", "early_stop_patience")
BOOLS = ("qk_norm", "zero_init_proj")
NUMBERS = (
    "learning_rate", "min_lr", "dropout", "weight_decay", "beta1", "beta2", "grad_clip", "val_fraction",
    "muon_learning_rate", "muon_weight_decay", "ema_decay", "seed",
)  # fmt: skip
REQUIRED_KEYS = POSITIVE_INTS + NON_NEGATIVE_INTS + BOOLS + NUMBERS + tuple(CHOICES)

# Keys that fix the model a checkpoint holds: its parameters' shapes and the function they compute.
MODEL_KEYS = (
    "vocab_size", "n_layer", "n_head", "n_embd", "block_size", "pos_encoding", "attn_scale", "mlp_activation",
    "qk_norm",
)  # fmt: skip
# What a run saved before a key existed did; any other missing key means the seed recipe's value.
OLD_RUN_DEFAULTS = {"dropout_rng": "jax", "ema_decay": 0.0, "optimizer": "adamw"}


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise OrpheusError naming the first bad key; return None if the config is usable."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise OrpheusError(f"config is missing keys: {', '.join(missing)}")

    def check(ok, message):
        if not ok:
            raise OrpheusError(f"bad config: {message}")

    for key in POSITIVE_INTS:
        check(_is_int(cfg[key]) and cfg[key] > 0, f"{key} must be a positive integer, got {cfg[key]!r}")
    for key in NON_NEGATIVE_INTS:
        check(_is_int(cfg[key]) and cfg[key] >= 0, f"{key} must be a non-negative integer, got {cfg[key]!r}")
    for key in BOOLS:
        check(isinstance(cfg[key], bool), f"{key} must be True or False, got {cfg[key]!r}")
    for key, allowed in CHOICES.items():
        check(cfg[key] in allowed, f"{key} must be one of {allowed}, got {cfg[key]!r}")
    check(cfg.n_embd % cfg.n_head == 0, f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    check(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    check(cfg.learning_rate > 0, f"learning_rate must be positive, got {cfg.learning_rate}")
    check(0 <= cfg.min_lr <= cfg.learning_rate, f"min_lr must be in [0, learning_rate], got {cfg.min_lr}")
    check(cfg.muon_learning_rate > 0, f"muon_learning_rate must be positive, got {cfg.muon_learning_rate}")
    check(cfg.muon_weight_decay >= 0, f"muon_weight_decay must be non-negative, got {cfg.muon_weight_decay}")
    check(cfg.weight_decay >= 0, f"weight_decay must be non-negative, got {cfg.weight_decay}")
    check(
        0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1,
        f"beta1 and beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}",
    )
    check(cfg.grad_clip >= 0, f"grad_clip must be non-negative (0 turns clipping off), got {cfg.grad_clip}")
    check(0 < cfg.val_fraction < 1, f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    check(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1) (0 turns averaging off), got {cfg.ema_decay}")
    check(
        _is_int(cfg.seed) and 0 <= cfg.seed < 2**32,
        f"seed must be an integer in [0, 2**32), got {cfg.seed!r}",
    )
    head_size = cfg.n_embd // cfg.n_head
    check(
        cfg.attention != "pallas" or (head_size >= 16 and head_size & (head_size - 1) == 0),
        f"attention pallas needs a head size that is a power of two, at least 16, got {head_size}",
    )
    check(
        cfg.attention != "pallas" or cfg.dropout == 0 or cfg.dropout_rng == "hash",
        "attention pallas draws its dropout masks from the hash: set dropout_rng to hash",
    )
    check(
        cfg.pos_encoding != "rope" or (cfg.n_embd // cfg.n_head) % 2 == 0,
        f"pos_encoding rope needs an even head size, got {cfg.n_embd // cfg.n_head}",
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def save(cfg: ml_collections.ConfigDict, vocab_size: int, path: str) -> None:
    write_atomically(path, json.dumps(dict(cfg.to_dict(), vocab_size=vocab_size), indent=2, sort_keys=True))


def load(path: str) -> ml_collections.ConfigDict:
    """A run's saved config (with vocab_size), completed with what runs saved before a key existed used."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise OrpheusError(f"cannot read run config {path}: {e}") from None
    if not isinstance(saved, dict):
        raise OrpheusError(f"cannot read run config {path}: not a JSON object")
    return ml_collections.ConfigDict({**OLD_RUN_DEFAULTS, **saved})


def model_mismatch(saved: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, vocab_size: int) -> str:
    """How `saved` and (cfg, vocab_size) differ in the model they describe; '' if they don't."""
    current = dict(cfg.to_dict(), vocab_size=vocab_size)
    defaults = {"mlp_activation": "relu", "qk_norm": False}  # runs saved before these keys existed
    diffs = [
        f"{k} {saved.get(k, defaults.get(k))} vs {current[k]}"
        for k in MODEL_KEYS
        if saved.get(k, defaults.get(k)) != current[k]
    ]
    return ", ".join(diffs)


def state_mismatch(saved: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict) -> str:
    """How `saved` and cfg differ in the train state's structure (the optimizer's state, the averaged
    weights); '' if they don't. A checkpoint restores only into the structure that saved it."""
    diffs = []
    if saved.optimizer != cfg.optimizer:
        diffs.append(f"optimizer {saved.optimizer} vs {cfg.optimizer}")
    if (saved.ema_decay > 0) != (cfg.ema_decay > 0):
        diffs.append(f"ema_decay {saved.ema_decay} vs {cfg.ema_decay} (averaged weights kept or not)")
    return ", ".join(diffs)
