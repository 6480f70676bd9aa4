import pytest

from configs import iliad_char, iliad_char_cpu, orpheus_seed, tiny
from orpheus_jax import OrpheusError
from orpheus_jax.config import load, model_mismatch, save, state_mismatch, validate


@pytest.mark.parametrize("module", [iliad_char, iliad_char_cpu, orpheus_seed, tiny])
def test_shipped_configs_are_valid(module):
    validate(module.get_config())


def test_seed_recipe():
    c = iliad_char.get_config()
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.batch_size, c.dropout, c.max_iters) == (
        6,
        6,
        384,
        256,
        64,
        0.2,
        5000,
    )
    assert (c.pos_encoding, c.val_fraction) == ("learned", 0.1)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("n_head", 5, "divisible by n_head"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("n_layer", -1, "n_layer must be a positive integer"),
        ("dropout", 1.0, "dropout must be in [0, 1)"),
        ("learning_rate", 0.0, "learning_rate must be positive"),
        ("pos_encoding", "alibi", "pos_encoding must be one of"),
        ("mlp_activation", "swish", "mlp_activation must be one of"),
        ("attention", "flash", "attention must be one of"),
        ("ema_decay", 1.0, "ema_decay must be in [0, 1)"),
        ("early_stop_patience", -1, "early_stop_patience must be a non-negative integer"),
        ("seed", -1, "seed must be an integer in [0, 2**32)"),
        ("dtype", "float16", "dtype must be one of"),
        ("attn_scale", "sqrt", "attn_scale must be one of"),
        ("cpu_dots", "mkl", "cpu_dots must be one of"),
        ("param_sharding", "zero3", "param_sharding must be one of"),
        ("device_data_budget", -1, "device_data_budget must be a non-negative integer"),
        ("optimizer", "sgd", "optimizer must be one of"),
        ("muon_learning_rate", 0.0, "muon_learning_rate must be positive"),
    ],
)
def test_bad_values_name_the_key(key, value, words):
    c = tiny.get_config()
    c[key] = value
    with pytest.raises(OrpheusError, match=None) as e:
        validate(c)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_default_recipe_draws_hash_masks_five_steps_per_call():
    c = iliad_char.get_config()
    assert (c.dropout_rng, c.steps_per_call) == ("hash", 5)


def test_intervals_need_not_be_multiples_of_steps_per_call():
    c = tiny.get_config()
    c.update(steps_per_call=3, log_interval=1, max_iters=7)  # the loop shortens calls to land on them
    validate(c)


def test_missing_key():
    c = tiny.get_config()
    del c["seed"]
    with pytest.raises(OrpheusError, match="missing keys: seed"):
        validate(c)


def test_model_mismatch_lists_the_differences():
    saved = tiny.get_config()
    saved.vocab_size = 66
    other = tiny.get_config()
    assert model_mismatch(saved, other, 66) == ""
    other.n_embd, other.mlp_activation = 64, "relu2"
    assert (
        model_mismatch(saved, other, 65)
        == "vocab_size 66 vs 65, n_embd 32 vs 64, mlp_activation relu vs relu2"
    )
    other.n_embd, other.mlp_activation = 32, "relu"
    # The same shapes, another function: a resumed run would silently train a different model.
    for key, value in (("attn_scale", "embd"), ("qk_norm", True)):
        changed = other.copy_and_resolve_references()
        changed[key] = value
        assert model_mismatch(saved, changed, 66) == f"{key} {saved[key]} vs {value}"
    other.dropout, other.learning_rate, other.zero_init_proj, other.token_embedding = 0.0, 1.0, True, "gather"
    other.attention, other.dtype = "fused", "bfloat16"  # how the model is computed or initialized: not it
    assert model_mismatch(saved, other, 66) == ""


def test_state_mismatch_names_the_optimizer_and_the_average():
    saved, other = tiny.get_config(), tiny.get_config()
    assert state_mismatch(saved, other) == ""
    other.optimizer, other.ema_decay = "muon", 0.99
    assert state_mismatch(saved, other) == (
        "optimizer adamw vs muon, ema_decay 0.0 vs 0.99 (averaged weights kept or not)"
    )
    other.optimizer, other.grad_clip, other.ema_decay = "adamw", 0.0, 0.0  # the same structure
    assert state_mismatch(saved, other) == ""


def test_a_run_saved_before_a_key_existed_loads_with_what_it_used(tmp_path):
    cfg = tiny.get_config()
    path = str(tmp_path / "config.json")
    save(cfg, 66, path)
    text = open(path).read().replace('"dropout_rng": "hash",', "")
    open(path, "w").write(text)
    assert load(path).dropout_rng == "jax" and load(path).vocab_size == 66
