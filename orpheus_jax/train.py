"""Training: the train state, the jitted train and eval steps, and the loop that runs them.

Everything random is derived from (seed, step): the batch and the dropout masks of step s come from
fold_in(rng, s), so a run resumed from a checkpoint at step s draws exactly what it would have drawn.
"""
import functools
import json
import os
import signal
import sys
import time
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm import tqdm

from orpheus_jax import OrpheusError, checkpoint, config as config_lib, data
from orpheus_jax.model import GPTConfig, forward, init_params
from orpheus_jax.optim import lr_schedule, make_optimizer
from orpheus_jax.sharding import batch_sharded, check_batch_divisible, make_mesh, replicated
from orpheus_jax.tokenizer import CharTokenizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw key data (uint32), so Orbax can save it


def init_state(cfg, model_cfg: GPTConfig, optimizer) -> TrainState:
    param_key, train_key = jax.random.split(jax.random.key(cfg.seed, impl=cfg.prng_impl))
    params = init_params(model_cfg, param_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(train_key))


def load_trained(workdir: str, step: int | None = None, mesh=None):
    """(run config, tokenizer, params, step) of a trained run, from its workdir alone."""
    if not os.path.isdir(workdir):
        raise OrpheusError(f"no such workdir: {workdir}")
    ckpt = checkpoint.Checkpointer(workdir, create=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise OrpheusError(f"no checkpoint in {workdir}: train first with python train.py --workdir {workdir}")
    cfg = config_lib.load(checkpoint.config_path(workdir))
    tokenizer = CharTokenizer.load(checkpoint.tokenizer_path(workdir))
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    abstract = jax.eval_shape(lambda: init_state(cfg, model_cfg, make_optimizer(cfg)))
    state = ckpt.restore(step, checkpoint.abstract_like(abstract, replicated(mesh or make_mesh())))
    ckpt.close()
    return cfg, tokenizer, state.params, step


def eval_key(cfg, step: int) -> jax.Array:
    """Eval batches: a stream apart from training's, so evaluating never changes what training draws."""
    return jax.random.fold_in(jax.random.key(cfg.seed + 1, impl=cfg.prng_impl), step)


def loss_fn(model_cfg, params, inputs_BT, targets_BT, rng=None, deterministic=True):
    logits_BTV = forward(model_cfg, params, inputs_BT, rng, deterministic)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


# XLA:CPU hands each dot to oneDNN instead of its default library: 0 to 23% faster train steps
# (benchmarks/RESULTS.md), but 2 to 3x slower batch-1 matvecs, so the sampler
# keeps XLA's choice. Accelerators never see these options.
ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# jaxlib cannot serialize oneDNN steps, so they are compiled afresh every run; that is the known cost
# of choosing them, not something to warn about on every start.
warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry.*onednn")


@functools.cache
def jaxlib_has_onednn_dots() -> bool:
    try:  # the options are experimental: a jaxlib that lacks them rejects them at compile time
        jax.jit(lambda x: x @ x, compiler_options=ONEDNN_DOTS).lower(jnp.ones((2, 2))).compile()
        return True
    except jax.errors.JaxRuntimeError:
        return False


def compiler_options(cfg, mesh) -> dict:
    """XLA options for the train and eval steps: oneDNN dots on CPU when cfg.cpu_dots asks for them."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    return ONEDNN_DOTS if cfg.cpu_dots == "onednn" and on_cpu and jaxlib_has_onednn_dots() else {}


def make_train_step(cfg, model_cfg: GPTConfig, optimizer, mesh):
    """jit(state, train_data) -> (state, losses of the steps_per_call steps taken)."""
    batch = batch_sharded(mesh)

    def micro_step(params, train_data, key):
        batch_key, dropout_key = jax.random.split(key)
        inputs_BT, targets_BT = data.sample_batch(train_data, batch_key, cfg.batch_size, cfg.block_size)
        inputs_BT, targets_BT = (lax.with_sharding_constraint(a, batch) for a in (inputs_BT, targets_BT))
        return jax.value_and_grad(lambda p: loss_fn(model_cfg, p, inputs_BT, targets_BT, dropout_key, False))(params)

    def one_step(state: TrainState, train_data):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=cfg.prng_impl), state.step)
        if cfg.grad_accum_steps == 1:
            loss, grads = micro_step(state.params, train_data, key)
        else:  # mean of micro-batch gradients: the gradient of the mean loss over the big batch
            def accumulate(grads_sum, micro_key):
                loss, grads = micro_step(state.params, train_data, micro_key)
                return jax.tree.map(jnp.add, grads_sum, grads), loss
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads_sum, losses = lax.scan(accumulate, zeros, jax.random.split(key, cfg.grad_accum_steps))
            loss, grads = losses.mean(), jax.tree.map(lambda g: g / cfg.grad_accum_steps, grads_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss

    def train_steps(state, train_data):
        # Several steps per call amortize dispatch for small models; the losses come back stacked.
        return lax.scan(lambda s, _: one_step(s, train_data), state, None, length=cfg.steps_per_call)

    rep = replicated(mesh)
    return jax.jit(train_steps, in_shardings=(rep, rep), out_shardings=(rep, rep), donate_argnums=0,
                   compiler_options=compiler_options(cfg, mesh))


def make_eval_step(cfg, model_cfg: GPTConfig, mesh):
    """jit(params, split_data, key) -> mean loss over eval_iters batches (the seed's estimate_loss)."""
    batch = batch_sharded(mesh)

    def eval_loss(params, split_data, key):
        def one_batch(_, k):
            inputs_BT, targets_BT = data.sample_batch(split_data, k, cfg.batch_size, cfg.block_size)
            inputs_BT, targets_BT = (lax.with_sharding_constraint(a, batch) for a in (inputs_BT, targets_BT))
            return None, loss_fn(model_cfg, params, inputs_BT, targets_BT)
        _, losses = lax.scan(one_batch, None, jax.random.split(key, cfg.eval_iters))
        return losses.mean()

    rep = replicated(mesh)
    return jax.jit(eval_loss, in_shardings=(rep, rep, rep), out_shardings=rep,
                   compiler_options=compiler_options(cfg, mesh))


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks between steps; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write(f"{self.signal}: stopping after this step to save a checkpoint (Ctrl-C again aborts)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def prepare_run(cfg, workdir: str, data_path: str, latest: int | None):
    """Everything checked before any work: data, tokenizer, and the workdir's checkpoint compatibility.

    Returns (tokenizer, train_tokens, val_tokens)."""
    text = data.read_text(data_path)
    if latest is None:
        tokenizer = CharTokenizer.from_text(text)
    else:  # resuming: the checkpoint's vocabulary and shapes rule
        if not os.path.exists(checkpoint.config_path(workdir)):
            raise OrpheusError(f"{workdir} holds checkpoints but no config.json; use another --workdir")
        saved = config_lib.load(checkpoint.config_path(workdir))
        tokenizer = CharTokenizer.load(checkpoint.tokenizer_path(workdir))
        mismatch = config_lib.shape_mismatch(saved, cfg, tokenizer.vocab_size)
        if mismatch:
            raise OrpheusError(f"{workdir} holds a checkpoint of a different model ({mismatch}); "
                               "use another --workdir or the same config")
    tokens = tokenizer.encode(text)
    train_tokens, val_tokens = data.split(tokens, cfg.val_fraction, cfg.block_size)
    return tokenizer, train_tokens, val_tokens


def train(cfg, workdir: str, data_path: str, *, devices=None) -> TrainState:
    """Train (or resume) the run in `workdir` until cfg.max_iters; return the final state."""
    mesh = make_mesh(devices)
    check_batch_divisible(cfg.batch_size, mesh)
    ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
    state = _train(cfg, workdir, data_path, mesh, ckpt)
    ckpt.close()  # not on errors: nothing is being saved then, and closing waits on Orbax's threads
    return state


def _train(cfg, workdir, data_path, mesh, ckpt: checkpoint.Checkpointer) -> TrainState:
    latest = ckpt.latest_step()
    tokenizer, train_tokens, val_tokens = prepare_run(cfg, workdir, data_path, latest)
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    optimizer = make_optimizer(cfg)
    rep = replicated(mesh)

    state = jax.jit(lambda: init_state(cfg, model_cfg, optimizer), out_shardings=rep)()
    if latest is not None:
        state = ckpt.restore(latest, checkpoint.abstract_like(state, rep))
    os.makedirs(workdir, exist_ok=True)
    config_lib.save(cfg, tokenizer.vocab_size, checkpoint.config_path(workdir))
    tokenizer.save(checkpoint.tokenizer_path(workdir))

    train_data, val_data = (jax.device_put(t, rep) for t in (train_tokens, val_tokens))
    step = int(state.step)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{n_params:,} parameters, vocab {tokenizer.vocab_size}, {len(train_tokens):,} train / "
          f"{len(val_tokens):,} val characters, {mesh.devices.size} {jax.default_backend()} device(s)"
          + (f"; resuming from step {step}" if latest is not None else ""), flush=True)
    if step >= cfg.max_iters:
        print(f"Already trained to step {step} (max_iters {cfg.max_iters}); raise --config.max_iters to continue.")
        return state

    t0 = time.perf_counter()
    train_step = make_train_step(cfg, model_cfg, optimizer, mesh).lower(state, train_data).compile()
    eval_step = make_eval_step(cfg, model_cfg, mesh)
    print(f"Compiled the train step in {time.perf_counter() - t0:.2f} s", flush=True)

    schedule = lr_schedule(cfg)
    metrics_file = checkpoint.metrics_path(workdir)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps

    def evaluate(at_step):
        key_train, key_val = jax.random.split(eval_key(cfg, at_step))
        train_loss = float(eval_step(state.params, train_data, key_train))
        val_loss = float(eval_step(state.params, val_data, key_val))
        tqdm.write(f"step {at_step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        sys.stdout.flush()
        _append_jsonl(metrics_file, dict(step=at_step, train_loss=train_loss, val_loss=val_loss,
                                         lr=float(schedule(at_step))))

    if step == 0:
        evaluate(0)
    bar = tqdm(total=cfg.max_iters, initial=step, unit="step", dynamic_ncols=True, disable=None)
    log_time, log_step = time.perf_counter(), step
    start_step, losses = step, None
    with _StopRequest() as stop:
        while step < cfg.max_iters and stop.signal is None:
            previous = losses if step > start_step else None
            state, losses = train_step(state, train_data)
            if previous is not None:
                # At most two steps in flight: the device never idles, the host never runs far ahead.
                previous.block_until_ready()
            step += cfg.steps_per_call
            bar.update(cfg.steps_per_call)
            if step % cfg.log_interval == 0:
                loss = float(losses[-1])  # the one sync per log_interval steps
                now = time.perf_counter()
                tokens_per_s = (step - log_step) * tokens_per_step / (now - log_time)
                log_time, log_step = now, step
                lr = float(schedule(step - 1))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                _append_jsonl(metrics_file, dict(step=step, loss=loss, lr=lr, tokens_per_s=tokens_per_s))
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                evaluate(step)
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_iters:
                ckpt.save(step, state)
        bar.close()
        if stop.signal is not None:
            ckpt.save(step, state)
    ckpt.wait()
    if stop.signal is not None:
        print(f"Stopped by {stop.signal} at step {step}; checkpoint saved in {ckpt.directory}. "
              f"Run the same command again to resume.", flush=True)
    else:
        print(f"Done: step {step}; checkpoints in {ckpt.directory}", flush=True)
    return state
