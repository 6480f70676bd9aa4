import json
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from orpheus_jax import OrpheusError, data
from orpheus_jax.model import GPTConfig, forward
from orpheus_jax.optim import hyperparams, make_optimizer
from orpheus_jax.sharding import make_mesh, replicated
from orpheus_jax.tokenizer import CharTokenizer
from orpheus_jax.train import (
    estimate_loss,
    init_state,
    jaxlib_has_onednn_dots,
    loss_fn,
    make_eval_step,
    make_train_step,
    train,
)


def run_steps(cfg, tokens, devices, n):
    """n train steps on a mesh over `devices`; returns (losses, final params as NumPy)."""
    mesh = make_mesh(devices)
    model_cfg = GPTConfig.from_run_config(cfg, 66)
    optimizer = make_optimizer(cfg)
    rep = replicated(mesh)
    state = jax.jit(lambda: init_state(cfg, model_cfg, optimizer), out_shardings=rep)()
    step = make_train_step(cfg, model_cfg, mesh)
    data = jax.device_put(tokens, rep)
    losses = []
    for _ in range(n):
        state, metrics = step(state, data, cfg.steps_per_call, hyperparams(cfg))
        losses.extend(np.asarray(metrics["loss"]).tolist())
    return np.array(losses), jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def iliad_tokens(iliad_path):
    text = open(iliad_path, encoding="utf-8").read()
    return CharTokenizer.from_text(text).encode(text)


def test_initial_loss_is_uniform(tiny_cfg, iliad_tokens):
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    state = init_state(tiny_cfg, model_cfg, make_optimizer(tiny_cfg))
    loss = estimate_loss(
        make_eval_step(tiny_cfg, model_cfg, make_mesh()), state.params, iliad_tokens, jax.random.key(0), 25
    )
    assert abs(loss - math.log(66)) < 0.05


def test_grouped_evaluation_gives_each_batchs_own_loss(tiny_cfg, iliad_tokens):
    """Batches run 4 to a forward pass (GPUs, TPUs) or one by one (CPUs): each key's loss is the loss
    of that key's batch alone (its logits' integer-label cross-entropy)."""
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    params = init_state(tiny_cfg, model_cfg, make_optimizer(tiny_cfg)).params
    tokens = jnp.asarray(iliad_tokens[:20_000])
    keys_E = jax.random.split(jax.random.key(3), 8)
    B, T = tiny_cfg.batch_size, tiny_cfg.block_size
    alone = []
    for key in keys_E:
        inputs_BT, targets_BT = data.inputs_targets(data.sample_windows(tokens, key, B, T))
        logits_BTV = forward(model_cfg, params, inputs_BT)
        alone.append(float(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()))
    for group in (4, 1):
        losses = make_eval_step(tiny_cfg, model_cfg, make_mesh(), group)(params, tokens, keys_E)
        np.testing.assert_allclose(np.asarray(losses), alone, rtol=1e-5)


@pytest.mark.parametrize(
    "prng_impl, dropout_rng",
    [
        ("threefry2x32", "hash"),  # the default; JAX's own bits and other generators in the full suite
        pytest.param("threefry2x32", "jax", marks=pytest.mark.slow),
        pytest.param("rbg", "jax", marks=pytest.mark.slow),
        pytest.param("unsafe_rbg", "jax", marks=pytest.mark.slow),
    ],
)
def test_one_device_and_eight_devices_agree(tiny_cfg, iliad_tokens, prng_impl, dropout_rng):
    assert len(jax.devices()) == 8
    tiny_cfg.prng_impl, tiny_cfg.dropout_rng = prng_impl, dropout_rng
    tiny_cfg.dropout = 0.2  # dropout on: masks must not depend on how the batch is split
    one_losses, one_params = run_steps(tiny_cfg, iliad_tokens, jax.devices()[:1], 3)
    all_losses, all_params = run_steps(tiny_cfg, iliad_tokens, jax.devices(), 3)
    np.testing.assert_allclose(one_losses, all_losses, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), one_params, all_params)
    assert not np.allclose(one_losses[0], one_losses[-1])  # it did train


@pytest.mark.slow  # oneDNN's steps cannot be kept in the compile cache: two compiles every run
@pytest.mark.skipif(not jaxlib_has_onednn_dots(), reason="this jaxlib has no oneDNN dot options")
def test_onednn_dots_train_like_xla_dots(tiny_cfg, iliad_tokens):
    """cpu_dots only moves the matmuls to another library: XLA's own dots are the reference."""
    tiny_cfg.update(n_embd=64, batch_size=16, dropout=0.2)
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    optimizer, mesh = make_optimizer(tiny_cfg), make_mesh()
    state = jax.eval_shape(lambda: init_state(tiny_cfg, model_cfg, optimizer))
    results = {}
    for cpu_dots in ("onednn", "xla"):
        tiny_cfg.cpu_dots = cpu_dots
        hlo = (
            make_train_step(tiny_cfg, model_cfg, mesh)
            .lower(state, iliad_tokens, 1, hyperparams(tiny_cfg))
            .compile()
            .as_text()
        )
        assert ("__onednn_fusion" in hlo) == (cpu_dots == "onednn")
        results[cpu_dots] = run_steps(tiny_cfg, iliad_tokens, None, 4)
    np.testing.assert_allclose(results["onednn"][0], results["xla"][0], atol=1e-5, rtol=0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
        results["onednn"][1],
        results["xla"][1],
    )


def test_steps_per_call_takes_the_same_steps(tiny_cfg, iliad_tokens):
    single_losses, single_params = run_steps(tiny_cfg, iliad_tokens, None, 4)
    tiny_cfg.steps_per_call = 2
    scan_losses, scan_params = run_steps(tiny_cfg, iliad_tokens, None, 2)
    np.testing.assert_allclose(single_losses, scan_losses, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), single_params, scan_params)


def first_step_reference(cfg, model_cfg, state, tokens):
    """The parameters after step 0, from the batch the step draws taken whole (no dropout): the key of
    step 0, split per micro-batch if there are several, then (batch, dropout); cfg's optimizer with its
    numbers as constants."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=cfg.prng_impl), 0)
    G = cfg.grad_accum_steps
    micro = [
        data.sample_batch(tokens, jax.random.split(k)[0], cfg.batch_size, cfg.block_size)
        for k in (jax.random.split(step_key, G) if G > 1 else [step_key])
    ]
    inputs, targets = (jnp.concatenate(parts) for parts in zip(*micro))
    optimizer = make_optimizer(cfg)

    @jax.jit  # one program: op by op, the optimizer's update alone compiles for seconds
    def one_big_batch_step(params, opt_state):
        grads = jax.grad(lambda p: loss_fn(model_cfg, p, inputs, targets))(params)
        updates, _ = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates)

    return one_big_batch_step(state.params, state.opt_state)


def test_gradient_accumulation_matches_one_big_batch(tiny_cfg, iliad_tokens):
    """Two micro-batches of 8 must step exactly like one batch of their 16 rows."""
    tiny_cfg.update(dropout=0.0, batch_size=8, grad_accum_steps=2)
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    state = jax.jit(lambda: init_state(tiny_cfg, model_cfg, make_optimizer(tiny_cfg)))()
    tokens = jnp.asarray(iliad_tokens)
    expected = first_step_reference(tiny_cfg, model_cfg, state, tokens)
    new_state, _ = make_train_step(tiny_cfg, model_cfg, make_mesh())(state, tokens, 1, hyperparams(tiny_cfg))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_state.params, expected)


def test_the_step_takes_the_optimizers_numbers_as_inputs(tiny_cfg, iliad_tokens):
    """Another learning rate, schedule, run length, weight decay, clipping norm or averaging rate is the
    same compiled step (the persistent cache serves it), and that step follows the numbers it is given."""
    # Muon's weight decay on (a zero is no decay operation at all, another program).
    tiny_cfg.update(dropout=0.0, warmup_iters=0, ema_decay=0.9, muon_weight_decay=0.01)
    other = tiny_cfg.copy_and_resolve_references()
    other.update(
        learning_rate=3e-3, min_lr=1e-4, warmup_iters=2, max_iters=50, lr_decay_iters=40, weight_decay=0.3,
        grad_clip=0.05, ema_decay=0.05, muon_learning_rate=0.05, muon_weight_decay=0.1,
    )  # fmt: skip
    model_cfg, mesh = GPTConfig.from_run_config(tiny_cfg, 66), make_mesh()
    source = jax.ShapeDtypeStruct((10_000,), np.uint8)
    for optimizer in ("adamw", "muon"):
        tiny_cfg.optimizer = other.optimizer = optimizer
        shapes = jax.eval_shape(lambda: init_state(tiny_cfg, model_cfg, make_optimizer(tiny_cfg)))
        programs = [
            make_train_step(cfg, model_cfg, mesh).lower(shapes, source, 1, hyperparams(cfg)).as_text()
            for cfg in (tiny_cfg, other)
        ]
        assert programs[0] == programs[1], optimizer
    tiny_cfg.optimizer = other.optimizer = "adamw"
    state = jax.jit(lambda: init_state(tiny_cfg, model_cfg, make_optimizer(tiny_cfg)))()
    tokens = jnp.asarray(iliad_tokens)
    expected = first_step_reference(other, model_cfg, state, tokens)  # its numbers as constants
    before = jax.tree.map(np.asarray, state.params)
    new_state, _ = make_train_step(tiny_cfg, model_cfg, mesh)(state, tokens, 1, hyperparams(other))
    # Adam's first update is about lr * sign(gradient): rounding in gradients near zero moves it a little.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new_state.params, expected)
    # The average moved at the given rate, 0.05 (the config's 0.9 would give min(0.9, 1 / 10) = 0.1).
    jax.tree.map(
        lambda e, p, p0: np.testing.assert_allclose(e, 0.05 * p0 + 0.95 * p, atol=1e-6),
        new_state.ema, new_state.params, before,
    )  # fmt: skip


@pytest.mark.slow
def test_overfits_a_short_text(tiny_cfg, tmp_path):
    text = "Sing, O goddess, the anger of Achilles son of Peleus. " * 4
    path = tmp_path / "short.txt"
    path.write_text(text)
    tiny_cfg.update(
        block_size=16,
        dropout=0.0,
        max_iters=300,
        warmup_iters=10,
        eval_interval=300,
        checkpoint_interval=300,
        log_interval=300,
        eval_iters=4,
        val_fraction=0.25,
        learning_rate=1e-2,
        min_lr=1e-4,
    )
    train(tiny_cfg, str(tmp_path / "run"), str(path))
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "train_loss" in line]
    # From uniform over 22 characters (ln 22 = 3.09) to little more than the first characters of
    # each window cost, having no context to place them in the sentence.
    assert evals[0]["train_loss"] > 2.9 and evals[-1]["train_loss"] < 0.2


def read_losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r}


@pytest.mark.slow
def test_resume_is_exact(tiny_cfg, small_text_path, tmp_path):
    tiny_cfg.update(max_iters=8, lr_decay_iters=16, log_interval=1, eval_interval=4, checkpoint_interval=4)
    straight = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "a"), small_text_path)
    tiny_cfg.max_iters = 4
    train(tiny_cfg, str(tmp_path / "b"), small_text_path)  # N steps, then the process "stops"
    tiny_cfg.max_iters = 8
    resumed = train(tiny_cfg, str(tmp_path / "b"), small_text_path)  # resume, N more
    assert int(resumed.step) == 8
    np.testing.assert_array_equal(
        list(read_losses(tmp_path / "a").values()), list(read_losses(tmp_path / "b").values())
    )
    jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
    jax.tree.map(np.testing.assert_array_equal, straight.opt_state, resumed.opt_state)


@pytest.mark.slow
def test_other_model_in_workdir_is_refused(tiny_cfg, small_text_path, tmp_path):
    tiny_cfg.max_iters = tiny_cfg.checkpoint_interval = 2
    train(tiny_cfg, str(tmp_path), small_text_path)
    tiny_cfg.n_layer = 3
    with pytest.raises(OrpheusError, match="different model .*n_layer 2 vs 3"):
        train(tiny_cfg, str(tmp_path), small_text_path)


def read_records(workdir):
    return [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]


@pytest.mark.slow
def test_resume_with_another_steps_per_call_lands_on_every_boundary(tiny_cfg, small_text_path, tmp_path):
    """Stopped at step 7 with 1 step per call, resumed with 5: the calls are shortened to reach
    step 10, then every interval and max_iters is hit, saved and logged as in one straight run."""
    tiny_cfg.update(max_iters=20, lr_decay_iters=20, log_interval=5, eval_interval=10, checkpoint_interval=10)
    straight = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "a"), small_text_path)
    tiny_cfg.max_iters = 7
    train(tiny_cfg, str(tmp_path / "b"), small_text_path)
    tiny_cfg.update(max_iters=20, steps_per_call=5)
    resumed = train(tiny_cfg, str(tmp_path / "b"), small_text_path)
    assert int(resumed.step) == 20
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["10", "20", "7"]
    a = read_records(tmp_path / "a")
    b = [
        r for r in read_records(tmp_path / "b") if r["step"] != 7
    ]  # the first run's end: logged and evaluated
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 5, 10, 10, 15, 20, 20]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        np.testing.assert_allclose(
            [ra[k] for k in ra if k != "tokens_per_s"], [rb[k] for k in rb if k != "tokens_per_s"], rtol=1e-5
        )
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), straight.params, resumed.params)


@pytest.mark.slow
def test_intervals_that_are_not_multiples_of_steps_per_call_are_landed_on(
    tiny_cfg, small_text_path, tmp_path
):
    """5 steps per call with logs every 3, evaluations every 4 and 10 steps: the calls are shortened
    to hit every boundary, and the run is the one-step-per-call run."""
    tiny_cfg.update(max_iters=10, log_interval=3, eval_interval=4, checkpoint_interval=4)
    straight = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "a"), small_text_path)
    tiny_cfg.steps_per_call = 5
    scanned = train(tiny_cfg, str(tmp_path / "b"), small_text_path)
    a, b = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 3, 4, 6, 8, 9, 10, 10]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints"), key=int) == ["4", "8", "10"]
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(
            [ra[k] for k in ra if k != "tokens_per_s"], [rb[k] for k in rb if k != "tokens_per_s"], rtol=1e-5
        )
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), straight.params, scanned.params)


@pytest.mark.slow
def test_a_resumed_run_keeps_its_own_randomness(tiny_cfg, small_text_path, tmp_path, capsys):
    """A run begun with JAX's dropout bits (as before hash became the default; older runs' config.json
    lacks the key) resumes with them, whatever the config now says, and ends as its straight self."""
    tiny_cfg.update(max_iters=8, lr_decay_iters=8, checkpoint_interval=4, dropout_rng="jax")
    straight = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "a"), small_text_path)
    tiny_cfg.max_iters = 4
    train(tiny_cfg, str(tmp_path / "b"), small_text_path)
    config_path = tmp_path / "b" / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["dropout_rng"]
    config_path.write_text(json.dumps(saved))
    tiny_cfg.update(max_iters=8, dropout_rng="hash", seed=7)
    resumed = train(tiny_cfg, str(tmp_path / "b"), small_text_path)
    assert "Resuming with the run's own seed=1337, dropout_rng=jax" in capsys.readouterr().out
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), straight.params, resumed.params)
    assert json.loads(config_path.read_text())["dropout_rng"] == "jax"


@pytest.mark.slow
def test_raising_max_iters_keeps_the_learning_rate_continuous(tiny_cfg, small_text_path, tmp_path):
    tiny_cfg.update(max_iters=20, log_interval=1, warmup_iters=5)
    workdir = str(tmp_path / "run")
    train(tiny_cfg, workdir, small_text_path)
    tiny_cfg.max_iters = 40
    train(tiny_cfg, workdir, small_text_path)
    lr = {r["step"]: r["lr"] for r in read_records(workdir) if "loss" in r}
    assert lr[20] == pytest.approx(tiny_cfg.min_lr)  # the first run decayed to min_lr at its end...
    assert all(lr[s] == pytest.approx(tiny_cfg.min_lr) for s in range(21, 41))  # ...and stays there
    assert json.load(open(f"{workdir}/config.json"))["lr_decay_iters"] == 20
    tiny_cfg.update(max_iters=60, lr_decay_iters=60)  # an explicit decay end rules
    train(tiny_cfg, workdir, small_text_path)
    lr = {r["step"]: r["lr"] for r in read_records(workdir) if "loss" in r}
    assert lr[41] > 2 * tiny_cfg.min_lr


@pytest.mark.slow
def test_log_and_eval_lines_report_the_rate_of_the_same_update(tiny_cfg, small_text_path, tmp_path):
    tiny_cfg.update(max_iters=10, warmup_iters=4, log_interval=5, eval_interval=5)
    train(tiny_cfg, str(tmp_path), small_text_path)
    records = read_records(tmp_path)
    by_step = {}
    for r in records:
        if "lr" in r:
            by_step.setdefault(r["step"], set()).add(r["lr"])
    assert all(len(rates) == 1 for rates in by_step.values()) and set(by_step) == {5, 10}
    assert "lr" not in records[0]  # the evaluation before any update


def rates_and_losses(workdir):
    return {r["step"]: (r["lr"], r["loss"]) for r in read_records(workdir) if "loss" in r}


@pytest.mark.slow
def test_a_raised_run_keeps_its_rate_through_any_number_of_interruptions(tiny_cfg, small_text_path, tmp_path):
    """Train to 20, raise max_iters to 40: the cosine ended at 20 and the rate stays at min_lr. Killed
    after step 25 and again after 35 (their later checkpoints lost), resumed by the same command, the
    run logs the rates and losses of the uninterrupted raised run."""
    tiny_cfg.update(
        max_iters=20, log_interval=1, checkpoint_interval=5, keep_checkpoints=10, eval_interval=40
    )
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train(tiny_cfg.copy_and_resolve_references(), straight, small_text_path)
    shutil.copytree(straight, interrupted)  # the same run to 20, then raised two ways
    raised = tiny_cfg.copy_and_resolve_references()
    raised.max_iters = 40
    train(raised.copy_and_resolve_references(), straight, small_text_path)
    for killed_after in (25, 35, None):
        train(raised.copy_and_resolve_references(), interrupted, small_text_path)
        if killed_after:
            for step in os.listdir(f"{interrupted}/checkpoints"):
                if int(step) > killed_after:
                    shutil.rmtree(f"{interrupted}/checkpoints/{step}")
    expected, got = rates_and_losses(straight), rates_and_losses(interrupted)
    assert sorted(got) == list(range(1, 41))
    assert all(got[s] == pytest.approx(expected[s], rel=1e-6) for s in got)
    assert all(got[s][0] == pytest.approx(tiny_cfg.min_lr) for s in range(20, 41))


@pytest.mark.slow
def test_another_optimizer_is_refused_before_any_work(tiny_cfg, small_text_path, tmp_path):
    tiny_cfg.max_iters = tiny_cfg.checkpoint_interval = 2
    train(tiny_cfg, str(tmp_path), small_text_path)
    tiny_cfg.update(optimizer="muon", max_iters=4)
    with pytest.raises(OrpheusError, match="another structure .*optimizer adamw vs muon") as e:
        train(tiny_cfg, str(tmp_path), small_text_path)
    assert "move it aside" not in str(e.value)


@pytest.mark.slow
def test_ctrl_c_just_after_a_calls_save_decision_still_saves(
    tiny_cfg, small_text_path, tmp_path, monkeypatch, capsys
):
    """A signal can come at any moment: one that lands after a call has decided not to save, before the
    loop looks again, must still end with a checkpoint of the last step, as the run then says."""
    import signal

    from orpheus_jax import train as train_lib

    one_call = train_lib.Trainer._one_call

    def signal_after_step_3(self):
        early_stop = one_call(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled here, by the run's own handler
        return early_stop

    monkeypatch.setattr(train_lib.Trainer, "_one_call", signal_after_step_3)
    tiny_cfg.update(max_iters=20, eval_interval=10, checkpoint_interval=10)
    step = int(train(tiny_cfg, str(tmp_path), small_text_path).step)
    assert 3 <= step < 10
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [step]
    assert f"Stopped by SIGINT at step {step}; checkpoint saved" in capsys.readouterr().out


def scripted_val_losses(monkeypatch, val_by_step):
    """Evaluations report these validation losses (by step), whatever the weights: what a run that
    overfits shows, without training one that long."""
    from orpheus_jax import train as train_lib

    calls = []

    def estimate(eval_step, params, split_data, key, eval_iters, should_stop=lambda: False):
        calls.append(None)
        step = sorted(val_by_step)[(len(calls) - 1) // 2]
        return val_by_step[step] + (0.0 if len(calls) % 2 == 0 else -0.1)  # (train, val) in turn

    monkeypatch.setattr(train_lib, "estimate_loss", estimate)


@pytest.mark.slow
def test_the_best_checkpoint_outlives_newer_ones_and_loads_as_best(
    tiny_cfg, small_text_path, tmp_path, monkeypatch, capsys
):
    """The validation loss is lowest at step 8, then rises: keep_checkpoints=1 newer saves must not delete
    step 8, a resumed run keeps the record, and load_run(step="best") gives step 8's weights."""
    from orpheus_jax.checkpoint import load_run
    from orpheus_jax.rundir import find_step, read_best

    scripted_val_losses(monkeypatch, {0: 4.0, 4: 3.0, 8: 2.5, 12: 2.7, 16: 2.9, 20: 3.1})
    tiny_cfg.update(eval_interval=4, checkpoint_interval=4, keep_checkpoints=1, log_interval=4)
    workdir = str(tmp_path / "run")
    tiny_cfg.max_iters = 12
    train(tiny_cfg.copy_and_resolve_references(), workdir, small_text_path)
    assert sorted(int(s) for s in os.listdir(f"{workdir}/checkpoints")) == [8, 12]
    tiny_cfg.max_iters = 20
    state = train(tiny_cfg, workdir, small_text_path)
    assert read_best(workdir) == (8, 2.5)
    assert sorted(int(s) for s in os.listdir(f"{workdir}/checkpoints")) == [8, 20]
    assert find_step(workdir, "best") == 8
    best = load_run(workdir, "best")
    assert best.step == 8
    assert not any(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(best.params), jax.tree.leaves(state.params))
    )
    assert "Best: val loss 2.5000 at step 8" in capsys.readouterr().out


@pytest.mark.slow
def test_early_stop_after_patience_evaluations_without_improvement(
    tiny_cfg, small_text_path, tmp_path, monkeypatch, capsys
):
    scripted_val_losses(monkeypatch, {0: 4.0, 2: 3.0, 4: 3.1, 6: 3.05, 8: 2.0, 10: 2.1})
    tiny_cfg.update(max_iters=40, eval_interval=2, checkpoint_interval=40, early_stop_patience=2)
    state = train(tiny_cfg, str(tmp_path), small_text_path)
    assert int(state.step) == 6  # steps 4 and 6 did not beat step 2
    assert "Stopped early at step 6" in capsys.readouterr().out
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 6]
    tiny_cfg.early_stop_patience = 3  # resumed with more patience: step 8 beats step 2, 10 does not
    tiny_cfg.max_iters = 10
    state = train(tiny_cfg, str(tmp_path), small_text_path)
    assert int(state.step) == 10


@pytest.mark.slow
def test_resume_with_averaged_weights_is_exact(tiny_cfg, small_text_path, tmp_path):
    from orpheus_jax.checkpoint import load_run

    tiny_cfg.update(max_iters=8, lr_decay_iters=8, eval_interval=4, checkpoint_interval=4, ema_decay=0.9)
    straight = train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "a"), small_text_path)
    tiny_cfg.max_iters = 4
    train(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "b"), small_text_path)
    tiny_cfg.max_iters = 8
    resumed = train(tiny_cfg, str(tmp_path / "b"), small_text_path)
    jax.tree.map(np.testing.assert_array_equal, straight.ema, resumed.ema)
    jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
    evals = [r["val_loss"] for r in read_records(tmp_path / "a") if "val_loss" in r]
    assert evals == [r["val_loss"] for r in read_records(tmp_path / "b") if "val_loss" in r]
    # The average is what a run evaluates and samples: load_run gives it, not the last weights.
    loaded = load_run(str(tmp_path / "a"))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, straight.ema)
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(straight.ema), jax.tree.leaves(straight.params))
    )


@pytest.mark.parametrize("grad_accum_steps, dropout", [(1, 0.1), (2, 0.0)])
def test_the_train_step_has_no_scatter(tiny_cfg, grad_accum_steps, dropout):
    """GPUs sum scatter-adds with atomics, in no fixed order: a step without any is deterministic there
    without XLA's deterministic-ops flag (the one-hot embedding and loss see to it)."""
    tiny_cfg.update(grad_accum_steps=grad_accum_steps, dropout=dropout, cpu_dots="xla", ema_decay=0.9)
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    optimizer = make_optimizer(tiny_cfg)
    state = jax.eval_shape(lambda: init_state(tiny_cfg, model_cfg, optimizer))
    source, hp = jax.ShapeDtypeStruct((10_000,), np.uint8), hyperparams(tiny_cfg)
    hlo = make_train_step(tiny_cfg, model_cfg, make_mesh()).lower(state, source, 2, hp).compile().as_text()
    scatters = lambda hlo: re.findall(r"\bscatter\(", hlo)  # instructions, not names in the metadata
    assert re.search(r"\b(dot|custom-call)\(", hlo) and not scatters(hlo)
    tiny_cfg.token_embedding = "gather"  # the lookup's gradient: the scatter-add the default avoids
    model_cfg = GPTConfig.from_run_config(tiny_cfg, 66)
    step = make_train_step(tiny_cfg, model_cfg, make_mesh())
    assert scatters(step.lower(state, source, 2, hp).compile().as_text())
