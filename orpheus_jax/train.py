"""Training: the train state, the jitted train and eval steps, and the loop that runs them.

Everything random is derived from (seed, step): the batch and the dropout masks of step s come from
fold_in(rng, s) (data.step_keys), so a run resumed from a checkpoint at step s draws exactly what it
would have drawn, on any number of devices and processes.
"""

import functools
import math
import os
import signal
import time
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm  # a widget in notebooks, the usual bar in a terminal

from orpheus_jax import (
    OrpheusError,
    WriteError,
    checkpoint,
    data,
    distributed,
    sharding,
    token_cache,
)
from orpheus_jax import (
    config as config_lib,
)
from orpheus_jax import metrics as metrics_lib
from orpheus_jax.model import GPTConfig, forward, init_params
from orpheus_jax.optim import lr_schedule, make_optimizer
from orpheus_jax.sampler import Sampler
from orpheus_jax.sharding import batch_sharded, check_batch_divisible, make_mesh, replicated
from orpheus_jax.tokenizer import CharTokenizer

EVAL_CHUNK = 10  # eval batches per jitted call: a stop request waits for one chunk, not a whole eval
# Every evaluation logs a sample: what `sample.py --max_new_tokens 200 --temperature 0.8` prints then.
EVAL_SAMPLE_CHARS, EVAL_SAMPLE_TEMPERATURE = 200, 0.8


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw key data (uint32), so Orbax can save it


def init_state(cfg, model_cfg: GPTConfig, optimizer) -> TrainState:
    param_key, train_key = jax.random.split(jax.random.key(cfg.seed, impl=cfg.prng_impl))
    params = init_params(model_cfg, param_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(train_key),
    )


def state_shardings(cfg, model_cfg: GPTConfig, optimizer, mesh):
    """The train state's shardings: replicated, or FSDP (cfg.param_sharding)."""
    shapes = jax.eval_shape(lambda: init_state(cfg, model_cfg, optimizer))
    return sharding.state_shardings(shapes, mesh, cfg.param_sharding)


def eval_key(cfg, step: int) -> jax.Array:
    """Eval batches: a stream apart from training's, so evaluating never changes what training draws."""
    return jax.random.fold_in(jax.random.key(cfg.seed + 1, impl=cfg.prng_impl), step)


def loss_fn(model_cfg, params, inputs_BT, targets_BT, rng=None, deterministic=True):
    logits_BTV = forward(model_cfg, params, inputs_BT, rng, deterministic)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


# XLA:CPU hands each dot to oneDNN instead of its default library: 0 to 23% faster train steps
# (benchmarks/RESULTS.md), but 2 to 3x slower batch-1 matvecs, so the sampler
# keeps XLA's choice. Accelerators never see these options.
ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
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
    """jit(state, train_source, n_steps) -> (state, {"loss", "grad_norm"} of each of the n_steps steps).

    train_source: the training split on every device (the step cuts its windows), or the windows of
    these n_steps steps cut on the host (windows_NGBW from data.HostSplit). n_steps is static
    (steps_per_call, or fewer to land on an interval boundary after a resume)."""
    batch, rep = batch_sharded(mesh), replicated(mesh)

    def micro_step(params, window_BW, dropout_key):
        inputs_BT, targets_BT = (
            lax.with_sharding_constraint(a, batch) for a in data.inputs_targets(window_BW)
        )
        # The parameters whole for the pass (a no-op unless FSDP); their gradient is summed back onto the shards.
        loss_of = lambda p: loss_fn(
            model_cfg, lax.with_sharding_constraint(p, rep), inputs_BT, targets_BT, dropout_key, False
        )
        return jax.value_and_grad(loss_of)(params)

    def one_step(state: TrainState, train_data, windows_GBW):
        key = jax.random.wrap_key_data(state.rng, impl=cfg.prng_impl)
        batch_keys_G, dropout_keys_G = data.step_keys(key, state.step, cfg.grad_accum_steps)

        def micro(params, batch_key, dropout_key, window_BW):
            if window_BW is None:
                window_BW = data.sample_windows(train_data, batch_key, cfg.batch_size, cfg.block_size)
            return micro_step(params, window_BW, dropout_key)

        if cfg.grad_accum_steps == 1:
            loss, grads = micro(
                state.params,
                batch_keys_G[0],
                dropout_keys_G[0],
                None if windows_GBW is None else windows_GBW[0],
            )
        else:  # mean of micro-batch gradients: the gradient of the mean loss over the big batch

            def accumulate(grads_sum, micro_xs):
                loss, grads = micro(state.params, *micro_xs)
                return jax.tree.map(jnp.add, grads_sum, grads), loss

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads_sum, losses = lax.scan(accumulate, zeros, (batch_keys_G, dropout_keys_G, windows_GBW))
            loss, grads = losses.mean(), jax.tree.map(lambda g: g / cfg.grad_accum_steps, grads_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def train_steps(state, train_source, n_steps):
        # Several steps per call amortize dispatch for small models; the metrics come back stacked.
        on_host = train_source.ndim > 1  # windows_NGBW
        return lax.scan(
            lambda s, windows_GBW: one_step(s, None if on_host else train_source, windows_GBW),
            state,
            train_source if on_host else None,
            length=n_steps,
        )

    shardings = state_shardings(cfg, model_cfg, optimizer, mesh)
    # The source keeps the sharding it was placed with (data.to_device, or HostSplit's batch split).
    return jax.jit(
        train_steps,
        static_argnums=2,
        in_shardings=(shardings, None),
        out_shardings=(shardings, rep),
        donate_argnums=0,
        compiler_options=compiler_options(cfg, mesh),
    )


def make_eval_step(cfg, model_cfg: GPTConfig, mesh):
    """jit(params, source, keys_C) -> losses_C: the loss of one batch per key.

    source: the split on every device, or the batches' windows cut on the host (windows_CBW)."""
    batch, rep = batch_sharded(mesh), replicated(mesh)

    def eval_losses(params, source, keys_C):
        params = lax.with_sharding_constraint(params, rep)
        on_host = source.ndim > 1

        def one_batch(_, xs):
            key, window_BW = xs
            if window_BW is None:
                window_BW = data.sample_windows(source, key, cfg.batch_size, cfg.block_size)
            inputs_BT, targets_BT = (
                lax.with_sharding_constraint(a, batch) for a in data.inputs_targets(window_BW)
            )
            return None, loss_fn(model_cfg, params, inputs_BT, targets_BT)

        return lax.scan(one_batch, None, (keys_C, source if on_host else None))[1]

    param_shardings = state_shardings(cfg, model_cfg, make_optimizer(cfg), mesh).params
    return jax.jit(
        eval_losses,
        in_shardings=(param_shardings, None, rep),
        out_shardings=rep,
        compiler_options=compiler_options(cfg, mesh),
    )


def estimate_loss(
    eval_step, params, split_data, key, eval_iters: int, should_stop=lambda: False
) -> float | None:
    """Mean loss over eval_iters batches (the seed's estimate_loss), in chunks of about EVAL_CHUNK
    batches; None if should_stop() turns true between chunks."""
    n_chunks = math.ceil(eval_iters / EVAL_CHUNK)
    chunk = math.ceil(eval_iters / n_chunks)
    keys = jax.random.split(key, n_chunks * chunk)  # the last chunk's extra batches are dropped below
    losses, pending = [], None
    for i in range(n_chunks):
        chunk_keys = keys[i * chunk : (i + 1) * chunk]
        source = split_data.eval_windows(chunk_keys) if isinstance(split_data, data.HostSplit) else split_data
        dispatched = eval_step(params, source, chunk_keys)
        if pending is not None:
            losses.append(np.asarray(pending))
        pending = dispatched
        if should_stop():
            return None
    losses.append(np.asarray(pending))
    return float(np.concatenate(losses)[:eval_iters].mean())


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(
        jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        )
    )


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the end of the current step (or evaluation chunk) and
    save a checkpoint. Further presses cannot lose that checkpoint; the third aborts at once."""

    def __init__(self):
        self.signal = None
        self._presses = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __call__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        self._presses += 1
        if self._presses == 1:
            self.signal = signal.Signals(signum).name
            tqdm.write(
                f"{self.signal}: stopping after this step to save a checkpoint "
                "(press Ctrl-C twice more to abort without saving)"
            )
        elif self._presses == 2:
            tqdm.write(
                "Still stopping: finishing this step and its checkpoint. Ctrl-C once more aborts, "
                "losing the work since the last checkpoint."
            )
        else:
            tqdm.write("Aborted without saving; the checkpoints already written are intact.")
            os._exit(130)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_run(cfg, workdir: str, data_path: str, latest: int | None):
    """Everything checked before any work: data, tokenizer, and the workdir's checkpoint compatibility.

    Returns (cfg, tokenizer, train_tokens, val_tokens); cfg is the given one, except that a resumed
    run keeps its randomness (continue_randomness) and, with a new max_iters, the learning-rate
    schedule it had (continue_schedule)."""
    if latest is None:
        tokenizer = None  # the text's own characters
    else:  # resuming: the checkpoint's vocabulary and shapes rule
        if not os.path.exists(checkpoint.config_path(workdir)):
            raise OrpheusError(f"{workdir} holds checkpoints but no config.json; use another --workdir")
        saved = config_lib.load(checkpoint.config_path(workdir))
        tokenizer = CharTokenizer.load(checkpoint.tokenizer_path(workdir))
        mismatch = config_lib.shape_mismatch(saved, cfg, tokenizer.vocab_size)
        if mismatch:
            raise OrpheusError(
                f"{workdir} holds a checkpoint of a different model ({mismatch}); "
                "use another --workdir or the same config"
            )
        cfg = continue_schedule(saved, cfg, latest)
        cfg = continue_randomness(saved, cfg)
    tokenizer, tokens = token_cache.load(data_path, tokenizer)
    train_tokens, val_tokens = data.split(tokens, cfg.val_fraction, cfg.block_size)
    return cfg, tokenizer, train_tokens, val_tokens


RANDOMNESS_KEYS = ("seed", "prng_impl", "dropout_rng")


def continue_randomness(saved, cfg):
    """The config a resumed run trains with, so that it draws the batches and dropout masks of its
    uninterrupted self: the saved run's seed and generators rule (a run saved before dropout_rng
    existed used JAX's bits), whatever the config file's defaults are now."""
    before_the_key = {"dropout_rng": GPTConfig.dropout_rng}  # what a run saved without the key drew with
    kept = {key: saved.get(key, before_the_key.get(key, cfg[key])) for key in RANDOMNESS_KEYS}
    changed = {key: value for key, value in kept.items() if value != cfg[key]}
    if not changed:
        return cfg
    cfg = cfg.copy_and_resolve_references()
    cfg.update(changed)
    print(
        "Resuming with the run's own "
        + ", ".join(f"{key}={value}" for key, value in changed.items())
        + " (its batches and dropout masks continue as they began); start a new --workdir to change them.",
        flush=True,
    )
    return cfg


def continue_schedule(saved, cfg, step: int):
    """The config a resumed run trains with, so that raising max_iters does not re-stretch the cosine.

    With lr_decay_iters = 0 the decay ends at max_iters; a new max_iters would move the curve under
    the steps already taken (5000 -> 10000 would send the seed recipe's lr up 5.6x). Instead the run
    keeps its decay end (then trains on at min_lr); an explicit --config.lr_decay_iters still rules."""
    if cfg.lr_decay_iters or saved.get("max_iters", cfg.max_iters) == cfg.max_iters:
        return cfg
    cfg = cfg.copy_and_resolve_references()
    cfg.lr_decay_iters = saved.get("lr_decay_iters") or saved.max_iters
    print(
        f"Continuing the learning-rate schedule of steps 0-{saved.max_iters}: the decay still ends at step "
        f"{cfg.lr_decay_iters}, then the rate stays at min_lr; set --config.lr_decay_iters to decay anew.",
        flush=True,
    )
    return cfg


def train(cfg, workdir: str, data_path: str, *, devices=None) -> TrainState:
    """Train (or resume) the run in `workdir` until cfg.max_iters; return the final state."""
    mesh = make_mesh(devices)
    check_batch_divisible(cfg.batch_size, mesh)
    # Process 0 holds the lock for all the processes of a run; only it writes outside the checkpoints.
    lock = checkpoint.WorkdirLock(workdir) if distributed.is_main() else None
    try:
        if lock and lock.previous_holder:
            print(
                f"Taking over {workdir} from a run that is no longer running ({lock.previous_holder})",
                flush=True,
            )
        ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints)
        state = _train(cfg, workdir, data_path, mesh, ckpt)
        ckpt.close()  # not on errors: closing waits on Orbax's threads, and _train waited for its saves
    finally:
        if lock:
            lock.release()
    return state


def _train(cfg, workdir, data_path, mesh, ckpt: checkpoint.Checkpointer) -> TrainState:
    try:
        return _train_loop(cfg, workdir, data_path, mesh, ckpt)
    except WriteError as e:
        raise OrpheusError(f"{e}; {ckpt.intact()}") from None
    except OrpheusError:
        try:
            ckpt.wait()  # a save in flight was checked finite: let it land before giving up
        except OrpheusError:
            pass
        raise


def _diverged(step: int, what: str, lr: float, ckpt: checkpoint.Checkpointer) -> OrpheusError:
    ckpt.wait()
    good = ckpt.complete_steps()
    where = (
        f"the last checkpoint, step {good[-1]}, is good and nothing later was saved"
        if good
        else "no checkpoint was saved"
    )
    return OrpheusError(
        f"training diverged at step {step}: {what} (learning rate {lr:.3g}); {where}. "
        "Lower --config.learning_rate (or raise --config.warmup_iters, set --config.grad_clip) "
        "and run the same command to resume" + (f" from step {good[-1]}" if good else "")
    )


def _train_loop(cfg, workdir, data_path, mesh, ckpt: checkpoint.Checkpointer) -> TrainState:
    latest = ckpt.latest_step()
    cfg, tokenizer, train_tokens, val_tokens = prepare_run(cfg, workdir, data_path, latest)
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    optimizer = make_optimizer(cfg)
    shardings = state_shardings(cfg, model_cfg, optimizer, mesh)
    if latest is None:
        state = jax.jit(lambda: init_state(cfg, model_cfg, optimizer), out_shardings=shardings)()
    else:  # onto this run's mesh and shardings, whatever the topology that saved it
        shapes = jax.eval_shape(lambda: init_state(cfg, model_cfg, optimizer))
        state = ckpt.restore(latest, checkpoint.abstract_like(shapes, shardings))
    main = distributed.is_main()
    if main:
        config_lib.save(cfg, tokenizer.vocab_size, checkpoint.config_path(workdir))
        tokenizer.save(checkpoint.tokenizer_path(workdir))
    metrics = metrics_lib.MetricsLog(
        checkpoint.metrics_path(workdir) if main else None,
        latest,
        tensorboard_dir=workdir if main else None,
        plot_path=checkpoint.plot_path(workdir) if main else None,
    )

    train_data, val_data = (
        data.place(t, mesh, cfg.device_data_budget, cfg.batch_size, cfg.block_size)
        for t in (train_tokens, val_tokens)
    )
    on_host = isinstance(train_data, data.HostSplit)
    train_key = jax.random.wrap_key_data(
        np.asarray(state.rng), impl=cfg.prng_impl
    )  # for windows cut on the host
    step = int(state.step)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    on_host_names = [
        name for name, d in (("train", train_data), ("val", val_data)) if isinstance(d, data.HostSplit)
    ]
    print(
        f"{n_params:,} parameters, vocab {tokenizer.vocab_size}, {len(train_tokens):,} train / "
        f"{len(val_tokens):,} val characters, {mesh.devices.size} {jax.default_backend()} device(s)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + (f", {cfg.param_sharding} parameters" if cfg.param_sharding != "replicated" else "")
        + (f"; {' and '.join(on_host_names)} split batched on the host" if on_host_names else "")
        + (f"; resuming from step {step}" if latest is not None else ""),
        flush=True,
    )
    if step >= cfg.max_iters:
        print(
            f"Already trained to step {step} (max_iters {cfg.max_iters}); raise --config.max_iters to continue."
        )
        return state

    def train_source(n):  # what the call of steps step .. step + n - 1 reads
        return train_data.train_windows(train_key, step, n, cfg.grad_accum_steps) if on_host else train_data

    t0 = time.perf_counter()
    jitted_train_step = make_train_step(cfg, model_cfg, optimizer, mesh)
    compiled = {
        cfg.steps_per_call: jitted_train_step.lower(
            state, train_source(cfg.steps_per_call), cfg.steps_per_call
        ).compile()
    }
    eval_step = make_eval_step(cfg, model_cfg, mesh)
    sampler = Sampler(model_cfg, state.params, batch_size=1, prng_impl=cfg.prng_impl, mesh=mesh)
    sample_prompt = tokenizer.encode(
        "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
    )  # sample.py's default
    print(f"Compiled the train step in {time.perf_counter() - t0:.2f} s", flush=True)

    def train_call(state, n):
        # Shorter calls land on a boundary that is not a multiple of steps_per_call (an interval, max_iters,
        # a resumed step); each new length compiles once.
        source = train_source(n)
        if n not in compiled:
            compiled[n] = jitted_train_step.lower(state, source, n).compile()
        return compiled[n](state, source)

    schedule = lr_schedule(cfg)
    lr_of = lambda s: float(schedule(s - 1))  # the rate of the update that brought the run to step s
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
    flops_per_token = metrics_lib.flops_per_token(cfg, n_params)
    intervals = (cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval)

    def evaluate(at_step, stop):
        key_train, key_val = jax.random.split(eval_key(cfg, at_step))
        losses = {}
        for name, key, split_data in (("train_loss", key_train, train_data), ("val_loss", key_val, val_data)):
            losses[name] = estimate_loss(eval_step, state.params, split_data, key, cfg.eval_iters, stop.poll)
            if losses[name] is None:
                tqdm.write(f"step {at_step}: evaluation cut short by {stop.signal}")
                return
        sampler.use_params(state.params)  # the sampler's compiled steps take the parameters as an argument
        sample_ids = sampler.generate(
            sample_prompt, EVAL_SAMPLE_CHARS, 0, [0], EVAL_SAMPLE_TEMPERATURE
        )  # sample.py's seed
        metrics.write(at_step, **losses, **({"lr": lr_of(at_step)} if at_step else {}))
        metrics.write_text(at_step, "sample", tokenizer.decode(np.concatenate(list(sample_ids), axis=1)))
        metrics.plot()
        tqdm.write(
            f"step {at_step}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
        )
        if not all(map(math.isfinite, losses.values())):
            raise _diverged(at_step, f"the evaluation loss is {losses['val_loss']}", lr_of(at_step), ckpt)

    unchecked = []  # (first step, metrics) of dispatched calls whose numbers the host has not read yet

    def check_finite(keep_last: int = 0):
        """Read the numbers of all but the last keep_last unchecked calls; stop at a non-finite one.
        Returns the last step's numbers (when keep_last is 0 and a call was unchecked)."""
        last = None
        while len(unchecked) > keep_last:
            first, call_metrics = unchecked.pop(0)
            host = jax.device_get(call_metrics)
            bad = ~(np.isfinite(host["loss"]) & np.isfinite(host["grad_norm"]))
            if bad.any():
                i = int(np.argmax(bad))
                raise _diverged(
                    first + i + 1,
                    f"loss {host['loss'][i]}, gradient norm {host['grad_norm'][i]}",
                    lr_of(first + i + 1),
                    ckpt,
                )
            last = {k: float(v[-1]) for k, v in host.items()}
        return last

    with _StopRequest() as request:
        stop = distributed.StopAgreement(request, mesh)  # every process stops after the same call
        if step == 0:
            evaluate(0, stop)
        start_step = step
        bar = tqdm(
            total=cfg.max_iters, initial=step, unit="step", dynamic_ncols=True, disable=None if main else True
        )
        log_time, log_step = time.perf_counter(), step
        while step < cfg.max_iters and not stop():
            boundary = min([step - step % i + i for i in intervals] + [cfg.max_iters])
            n = min(cfg.steps_per_call, boundary - step)
            state, call_metrics = train_call(state, n)
            unchecked.append((step, call_metrics))
            stop.poll()
            step += n
            # At most two calls in flight: the device never idles, the host never runs far ahead.
            check_finite(keep_last=1)
            bar.update(n)
            at = lambda interval: step % interval == 0 or step == cfg.max_iters
            if at(cfg.log_interval):
                last = check_finite()  # the one sync per log_interval steps
                now = time.perf_counter()
                tokens_per_s = (step - log_step) * tokens_per_step / (now - log_time)
                mfu = metrics_lib.mfu(tokens_per_s, flops_per_token, mesh.devices.flat)  # None on a CPU
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}",
                    lr=f"{lr_of(step):.2e}",
                    tok_s=f"{tokens_per_s:,.0f}",
                    **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
                )
                metrics.write(
                    step,
                    loss=last["loss"],
                    grad_norm=last["grad_norm"],
                    lr=lr_of(step),
                    tokens_per_s=tokens_per_s,
                    mfu=mfu,
                )
                log_time, log_step = now, step
            evaluating = at(cfg.eval_interval) and not stop()  # a pending stop saves first, skips the eval
            if evaluating:
                check_finite()
                evaluate(step, stop)
            saving = at(cfg.checkpoint_interval) or stop()  # after the eval: a stop may have cut it short
            if saving:
                check_finite()
                if not bool(all_finite(state)):
                    raise _diverged(
                        step, "the parameters or optimizer state hold non-finite values", lr_of(step), ckpt
                    )
                ckpt.save(step, state)
            if evaluating or saving:  # tokens/s counts training time only
                log_time, log_step = time.perf_counter(), step
        bar.close()
        ckpt.wait()  # still under the stop handler: a Ctrl-C here cannot cut the save short
    if not stop():
        print(f"Done: step {step}; checkpoints in {ckpt.directory}", flush=True)
    elif step > start_step:
        print(
            f"Stopped by {stop.signal} at step {step}; checkpoint saved in {ckpt.directory}. "
            f"Run the same command again to resume.",
            flush=True,
        )
    else:
        print(
            f"Stopped by {stop.signal} at step {step}, before training further: nothing new to save.",
            flush=True,
        )
    return state
