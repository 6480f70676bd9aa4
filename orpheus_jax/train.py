"""Training: the train state, the jitted train and eval steps, and the Trainer that runs them.

Everything random is derived from (seed, step): the batch and the dropout masks of step s come from
fold_in(rng, s) (data.step_keys), so a run resumed from a checkpoint at step s draws exactly what it
would have drawn, on any number of devices and processes. The step is deterministic on GPUs too without
asking XLA for deterministic kernels: nothing in it is a scatter-add (the embedding and the loss take
one-hot products), so no atomics sum in a varying order.
"""

import functools
import math
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm  # a widget in notebooks, the usual bar in a terminal

from orpheus_jax import OrpheusError, WriteError, checkpoint, data, distributed, rundir, sharding, token_cache
from orpheus_jax import config as config_lib
from orpheus_jax import metrics as metrics_lib
from orpheus_jax.model import GPTConfig, forward, init_params, matmul_params, prepare
from orpheus_jax.optim import hyperparams, lr_schedule, make_optimizer
from orpheus_jax.sharding import batch_sharded, check_batch_divisible, make_mesh, replicated
from orpheus_jax.tokenizer import CharTokenizer

EVAL_CALL_BATCHES = 40  # eval batches per jitted call: a stop request waits for one call, not a whole eval
# Eval batches run as one forward pass of EVAL_GROUP * batch_size rows on GPUs and TPUs: fewer, fuller
# passes, the same estimate. On CPUs one batch a pass measured faster (RESULTS, 2026-12-05).
EVAL_GROUP = 4
# Every evaluation logs a sample: what `sample.py --max_new_tokens 200 --temperature 0.8` prints then.
EVAL_SAMPLE_CHARS, EVAL_SAMPLE_TEMPERATURE = 200, 0.8


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw key data (uint32), so Orbax can save it
    ema: dict | None = None  # the exponential moving average of params (ema_decay > 0), else None


def init_state(cfg, model_cfg: GPTConfig, optimizer) -> TrainState:
    param_key, train_key = jax.random.split(jax.random.key(cfg.seed, impl=cfg.prng_impl))
    params = init_params(model_cfg, param_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        rng=jax.random.key_data(train_key), ema=params if cfg.ema_decay > 0 else None,
    )  # fmt: skip


def weights(state: TrainState) -> dict:
    """The weights a run evaluates, keeps as its best, samples and exports: the average when it keeps one."""
    return state.params if state.ema is None else state.ema


def ema_update(ema, params, decay: float, step):
    """One step of the average: decay ramps up as min(decay, (1 + step) / (10 + step)), so the first
    steps' weights (far from the trained ones) fade out quickly."""
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, ema, params)


def state_shardings(cfg, model_cfg: GPTConfig, optimizer, mesh):
    """The train state's shardings: replicated, or FSDP (cfg.param_sharding)."""
    shapes = jax.eval_shape(lambda: init_state(cfg, model_cfg, optimizer))
    return sharding.state_shardings(shapes, mesh, cfg.param_sharding)


def eval_key(cfg, step: int) -> jax.Array:
    """Eval batches: a stream apart from training's, so evaluating never changes what training draws."""
    return jax.random.fold_in(jax.random.key(cfg.seed + 1, impl=cfg.prng_impl), step)


def token_losses(model_cfg, params, inputs_BT, targets_BT, rng=None, deterministic=True):
    """Cross-entropy of every position, against one-hot targets: its gradient is a product, where the
    integer-label form's (a gather) is a scatter-add."""
    logits_BTV = forward(model_cfg, params, inputs_BT, rng, deterministic)
    return optax.softmax_cross_entropy(logits_BTV, jax.nn.one_hot(targets_BT, model_cfg.vocab_size))


def loss_fn(model_cfg, params, inputs_BT, targets_BT, rng=None, deterministic=True):
    return token_losses(model_cfg, params, inputs_BT, targets_BT, rng, deterministic).mean()


# XLA:CPU hands each dot to oneDNN instead of its default library: faster train steps (RESULTS.md), but
# slower batch-1 matvecs, so the sampler keeps XLA's choice. Accelerators never see these options.
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


def make_train_step(cfg, model_cfg: GPTConfig, mesh):
    """jit(state, train_source, n_steps, hp) -> (state, {"loss", "grad_norm"} of each of the n_steps steps).

    train_source: the training split on every device (the step cuts its windows), or the windows of
    these n_steps steps cut on the host (windows_MGBW from data.HostSplit). n_steps is static
    (steps_per_call, or fewer to land on an interval boundary after a resume). hp: the optimizer's
    numbers, optim.hyperparams(cfg)."""
    batch, rep = batch_sharded(mesh), replicated(mesh)
    prepare(model_cfg)

    def micro_step(params, window_BW, dropout_key):
        inputs_BT, targets_BT = (
            lax.with_sharding_constraint(a, batch) for a in data.inputs_targets(window_BW)
        )
        # The parameters whole for the pass (a no-op unless FSDP); the gradient is summed onto the shards.
        whole = lambda p: lax.with_sharding_constraint(p, rep)
        loss_of = lambda p: loss_fn(model_cfg, whole(p), inputs_BT, targets_BT, dropout_key, False)
        return jax.value_and_grad(loss_of)(params)

    def one_step(state: TrainState, train_data, windows_GBW, hp):
        key = jax.random.wrap_key_data(state.rng, impl=cfg.prng_impl)
        batch_keys_G, dropout_keys_G = data.step_keys(key, state.step, cfg.grad_accum_steps)

        def micro(params, batch_key, dropout_key, window_BW):
            if window_BW is None:
                window_BW = data.sample_windows(train_data, batch_key, cfg.batch_size, cfg.block_size)
            return micro_step(params, window_BW, dropout_key)

        if cfg.grad_accum_steps == 1:
            window_BW = None if windows_GBW is None else windows_GBW[0]
            loss, grads = micro(state.params, batch_keys_G[0], dropout_keys_G[0], window_BW)
        else:  # mean of micro-batch gradients: the gradient of the mean loss over the big batch

            def accumulate(grads_sum, micro_xs):
                loss, grads = micro(state.params, *micro_xs)
                return jax.tree.map(jnp.add, grads_sum, grads), loss

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads_sum, losses = lax.scan(accumulate, zeros, (batch_keys_G, dropout_keys_G, windows_GBW))
            loss, grads = losses.mean(), jax.tree.map(lambda g: g / cfg.grad_accum_steps, grads_sum)
        updates, opt_state = make_optimizer(cfg, hp).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = None if state.ema is None else ema_update(state.ema, params, hp["ema_decay"], state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def train_steps(state, train_source, n_steps, hp):
        # Several steps per call amortize dispatch for small models; the metrics come back stacked.
        on_host = train_source.ndim > 1  # windows_MGBW
        step = lambda s, windows_GBW: one_step(s, None if on_host else train_source, windows_GBW, hp)
        return lax.scan(step, state, train_source if on_host else None, length=n_steps)

    shardings = state_shardings(cfg, model_cfg, make_optimizer(cfg), mesh)
    # The source keeps the sharding it was placed with (data.to_device, or HostSplit's batch split).
    return jax.jit(
        train_steps, static_argnums=2, in_shardings=(shardings, None, rep), out_shardings=(shardings, rep),
        donate_argnums=0, compiler_options=compiler_options(cfg, mesh),
    )  # fmt: skip


def eval_group(mesh) -> int:
    """Eval batches per forward pass on this mesh's platform."""
    return 1 if mesh.devices.flat[0].platform == "cpu" else EVAL_GROUP


def make_eval_step(cfg, model_cfg: GPTConfig, mesh, group: int | None = None):
    """jit(params, source, keys_E) -> losses_E: the loss of one batch per key.

    source: the split on every device, or the batches' windows cut on the host (windows_EBW). The E
    batches run `group` (default: eval_group(mesh)) at a time as one forward pass (the same windows,
    so the same estimate), scanned inside the one call."""
    batch, rep = batch_sharded(mesh), replicated(mesh)
    prepare(model_cfg)
    max_group = eval_group(mesh) if group is None else group

    def eval_losses(params, source, keys_E):
        params = lax.with_sharding_constraint(params, rep)
        E, B, T = keys_E.shape[0], cfg.batch_size, cfg.block_size
        if source.ndim > 1:
            windows_EBW = source
        else:
            windows_EBW = jax.vmap(lambda key: data.sample_windows(source, key, B, T))(keys_E)
        group = math.gcd(max_group, E)
        windows_xRW = windows_EBW.reshape(E // group, group * B, T + 1)  # R = group * B rows

        def one_group(_, window_RW):
            inputs_RT, targets_RT = (
                lax.with_sharding_constraint(a, batch) for a in data.inputs_targets(window_RW)
            )
            losses_RT = token_losses(model_cfg, params, inputs_RT, targets_RT)
            return None, losses_RT.reshape(group, B * T).mean(axis=1)  # each batch's own mean

        return lax.scan(one_group, None, windows_xRW)[1].reshape(E)

    param_shardings = state_shardings(cfg, model_cfg, make_optimizer(cfg), mesh).params
    return jax.jit(
        eval_losses, in_shardings=(param_shardings, None, rep), out_shardings=rep,
        compiler_options=compiler_options(cfg, mesh),
    )  # fmt: skip


def eval_keys(key: jax.Array, eval_iters: int) -> list[jax.Array]:
    """The keys of an estimate's batches, in calls of at most EVAL_CALL_BATCHES (all calls the same
    size, so one compilation serves them; the last call's extra batches are dropped)."""
    n_calls = math.ceil(eval_iters / EVAL_CALL_BATCHES)
    per_call = math.ceil(eval_iters / n_calls)
    keys = jax.random.split(key, n_calls * per_call)
    return [keys[i * per_call : (i + 1) * per_call] for i in range(n_calls)]


def estimate_loss(
    eval_step, params, split_data, key, eval_iters: int, should_stop=lambda: False
) -> float | None:
    """Mean loss over eval_iters batches (the seed's estimate_loss); None if should_stop() turns true
    between calls."""
    losses, pending = [], None
    for call_keys in eval_keys(key, eval_iters):
        source = split_data.eval_windows(call_keys) if isinstance(split_data, data.HostSplit) else split_data
        dispatched = eval_step(params, source, call_keys)
        if pending is not None:
            losses.append(np.asarray(pending))
        pending = dispatched
        if should_stop():
            return None
    losses.append(np.asarray(pending))
    return float(np.concatenate(losses)[:eval_iters].mean())


def write_draft_index(workdir: str, train_tokens) -> None:
    """<workdir>/drafts.npz, the draft index of the training split's first drafts.MAX_INDEX_TOKENS tokens,
    unless the run has one. Sampling goes on without it (drafting from its own context), so a failure to
    write it is one line, not the end of training."""
    import os

    from orpheus_jax import drafts

    path = rundir.drafts_path(workdir)
    if os.path.exists(path):
        return
    try:
        drafts.save_index(path, drafts.build_index(np.asarray(train_tokens[: drafts.MAX_INDEX_TOKENS])))
    except OSError as e:
        tqdm.write(f"warning: cannot write the draft index {path} ({e.strerror or e}); sampling drafts less")


@jax.jit
def all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves))


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the end of the current step (or evaluation call) and
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
        import os

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
    run keeps its randomness (continue_randomness) and its learning-rate schedule (continue_schedule)."""
    import os

    tokenizer = None  # the text's own characters
    if latest is not None:  # resuming: the checkpoint's vocabulary, model and state structure rule
        if not os.path.exists(rundir.config_path(workdir)):
            raise OrpheusError(f"{workdir} holds checkpoints but no config.json; use another --workdir")
        saved = config_lib.load(rundir.config_path(workdir))
        tokenizer = CharTokenizer.load(rundir.tokenizer_path(workdir))
        mismatch = config_lib.model_mismatch(saved, cfg, tokenizer.vocab_size)
        if mismatch:
            raise OrpheusError(
                f"{workdir} holds a checkpoint of a different model ({mismatch}); "
                "use another --workdir or the same config"
            )
        mismatch = config_lib.state_mismatch(saved, cfg)
        if mismatch:
            raise OrpheusError(
                f"{workdir} holds a checkpoint whose training state has another structure ({mismatch}); "
                "resume with the run's own values or use another --workdir"
            )
        cfg = continue_randomness(saved, continue_schedule(saved, cfg))
    tokenizer, tokens = token_cache.load(data_path, tokenizer)
    train_tokens, val_tokens = data.split(tokens, cfg.val_fraction, cfg.block_size)
    return cfg, tokenizer, train_tokens, val_tokens


RANDOMNESS_KEYS = ("seed", "prng_impl", "dropout_rng")


def continue_randomness(saved, cfg):
    """The config a resumed run trains with, so that it draws the batches and dropout masks of its
    uninterrupted self: the saved run's seed and generators rule, whatever the config file says now."""
    changed = {
        key: saved.get(key, cfg[key]) for key in RANDOMNESS_KEYS if saved.get(key, cfg[key]) != cfg[key]
    }
    if not changed:
        return cfg
    cfg = cfg.copy_and_resolve_references()
    cfg.update(changed)
    print(
        "Resuming with the run's own " + ", ".join(f"{key}={value}" for key, value in changed.items())
        + " (its batches and dropout masks continue as they began); start a new --workdir to change them.",
        flush=True,
    )  # fmt: skip
    return cfg


def continue_schedule(saved, cfg):
    """The config a resumed run trains with, so that changing max_iters never moves the cosine under
    the steps already taken (5000 -> 10000 would send the seed recipe's rate up 5.6x).

    The run's decay end is its own: where the saved run's decay ended (its lr_decay_iters, or its
    max_iters when that was 0), it still ends, then the rate stays at min_lr. Saved in config.json, so
    any number of later resumes keep it. An explicit lr_decay_iters in the config rules."""
    decay_end = saved.get("lr_decay_iters") or saved.max_iters
    if cfg.lr_decay_iters or decay_end == cfg.max_iters:
        return cfg
    cfg = cfg.copy_and_resolve_references()
    cfg.lr_decay_iters = decay_end
    print(
        f"Continuing the run's learning-rate schedule: the decay still ends at step {decay_end}, then "
        "the rate stays at min_lr; set --config.lr_decay_iters to decay anew.",
        flush=True,
    )
    return cfg


def train(cfg, workdir: str, data_path: str, *, devices=None, launched_at: float | None = None) -> TrainState:
    """Train (or resume) the run in `workdir` until cfg.max_iters; return the final state.

    launched_at: time.perf_counter() when the process began (for the time breakdown at the end)."""
    mesh = make_mesh(devices)
    check_batch_divisible(cfg.batch_size, mesh)
    timer = metrics_lib.TimeBreakdown(time.perf_counter() if launched_at is None else launched_at)
    # Process 0 holds the lock for all the processes of a run; only it writes outside the checkpoints.
    main = distributed.is_main()
    lock = rundir.WorkdirLock(workdir) if main else None
    try:
        if lock and lock.previous_holder:
            print(
                f"Taking over {workdir} from a run that is no longer running ({lock.previous_holder})",
                flush=True,
            )
        ckpt = checkpoint.Checkpointer(workdir, cfg.keep_checkpoints, writes_record=main)
        state = _train(cfg, workdir, data_path, mesh, ckpt, timer)
        ckpt.close()  # not on errors: closing waits on Orbax's threads, and _train waited for its saves
    finally:
        if lock:
            lock.release()
    return state


def _train(cfg, workdir, data_path, mesh, ckpt: checkpoint.Checkpointer, timer) -> TrainState:
    try:
        return Trainer(cfg, workdir, data_path, mesh, ckpt, timer).run()
    except WriteError as e:
        raise OrpheusError(f"{e}; {ckpt.intact()}") from None
    except OrpheusError:
        try:
            ckpt.wait()  # a save in flight was checked finite: let it land before giving up
        except OrpheusError:
            pass
        raise


class Trainer:
    """One run's loop and the state it owns: the train state and step, the calls whose numbers the
    host has not read yet, the compiled steps, the logs and the best checkpoint's record."""

    def __init__(self, cfg, workdir, data_path, mesh, ckpt: checkpoint.Checkpointer, timer):
        self.workdir, self.mesh, self.ckpt, self.timer = workdir, mesh, ckpt, timer
        self.resumed_from = ckpt.latest_step()
        self.cfg, self.tokenizer, train_tokens, val_tokens = prepare_run(
            cfg, workdir, data_path, self.resumed_from
        )
        cfg = self.cfg
        self.model_cfg = GPTConfig.from_run_config(cfg, self.tokenizer.vocab_size)
        self.optimizer = make_optimizer(cfg)
        self.state = self._initial_state()
        # The step's inputs, on every device once: a new learning rate or length compiles nothing.
        hp = hyperparams(cfg)
        self.hp = jax.tree.map(lambda v: data.to_device(v, mesh), hp)
        self.main = distributed.is_main()
        if self.main:
            config_lib.save(cfg, self.tokenizer.vocab_size, rundir.config_path(workdir))
            self.tokenizer.save(rundir.tokenizer_path(workdir))
        main = self.main
        self.metrics = metrics_lib.MetricsLog(
            rundir.metrics_path(workdir) if main else None, self.resumed_from,
            tensorboard_dir=workdir if main else None, plot_path=rundir.plot_path(workdir) if main else None,
        )  # fmt: skip
        self.train_data, self.val_data = (
            data.place(t, mesh, cfg.device_data_budget, cfg.batch_size, cfg.block_size)
            for t in (train_tokens, val_tokens)
        )
        # For windows cut on the host.
        self.train_key = jax.random.wrap_key_data(np.asarray(self.state.rng), impl=cfg.prng_impl)
        self.step = int(self.state.step)
        self.unchecked = []  # (first step, metrics) of dispatched calls whose numbers the host has not read
        self.schedule = lr_schedule(hp)  # the rates logged, on the host
        self.evals_since_best = self._evals_since_best()
        self.background = ThreadPoolExecutor(max_workers=1)  # each evaluation's sample and plot
        self.report = None  # the future of the last evaluation's sample and plot
        # Beside the compilation, once per run: the draft index sample.py's speculative decoding reads.
        self.index_job = (
            self.background.submit(write_draft_index, workdir, train_tokens) if self.main else None
        )
        self._announce(len(train_tokens), len(val_tokens))

    def _initial_state(self) -> TrainState:
        cfg, shardings = self.cfg, state_shardings(self.cfg, self.model_cfg, self.optimizer, self.mesh)
        if self.resumed_from is None:
            return jax.jit(lambda: init_state(cfg, self.model_cfg, self.optimizer), out_shardings=shardings)()
        # Onto this run's mesh and shardings, whatever the topology that saved it.
        shapes = jax.eval_shape(lambda: init_state(cfg, self.model_cfg, self.optimizer))
        return self.ckpt.restore(self.resumed_from, checkpoint.abstract_like(shapes, shardings))

    def _evals_since_best(self) -> int:
        """Evaluations after the best one up to the resumed step: the same on every process."""
        best = self.ckpt.best_so_far()
        if best is None or self.resumed_from is None:
            return 0
        interval = self.cfg.eval_interval
        return self.resumed_from // interval - best[0] // interval

    def _announce(self, n_train: int, n_val: int) -> None:
        cfg, mesh = self.cfg, self.mesh
        n_params = sum(x.size for x in jax.tree.leaves(self.state.params))
        on_host = [
            name
            for name, d in (("train", self.train_data), ("val", self.val_data))
            if isinstance(d, data.HostSplit)
        ]
        print(
            f"{n_params:,} parameters, vocab {self.tokenizer.vocab_size}, {n_train:,} train / "
            f"{n_val:,} val characters, {mesh.devices.size} {jax.default_backend()} device(s)"
            + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
            + (f", {cfg.param_sharding} parameters" if cfg.param_sharding != "replicated" else "")
            + (f"; {' and '.join(on_host)} split batched on the host" if on_host else "")
            + (f"; resuming from step {self.step}" if self.resumed_from is not None else ""),
            flush=True,
        )

    def lr_of(self, step: int) -> float:
        return float(self.schedule(step - 1))  # the rate of the update that brought the run to step s

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> TrainState:
        cfg = self.cfg
        if self.step >= cfg.max_iters:
            print(
                f"Already trained to step {self.step} (max_iters {cfg.max_iters}); "
                "raise --config.max_iters to continue."
            )
            self._wait_index()
            return self.state
        self._compile()
        start_step = self.step
        with StopRequest() as request:
            self.stop = distributed.StopAgreement(
                request, self.mesh
            )  # every process stops after the same call
            if self.step == 0:
                self._evaluate(0)
            self.bar = tqdm(
                total=cfg.max_iters,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                disable=None if self.main else True,
            )
            self.log_time, self.log_step, self.excluded = time.perf_counter(), self.step, 0.0
            early_stop = False
            while self.step < cfg.max_iters and not self.stop() and not early_stop:
                early_stop = self._one_call()
            self.bar.close()
            with self.timer.part("checkpoints"):
                self.ckpt.wait()  # still under the stop handler: a Ctrl-C here cannot cut the save short
            self._finish_report()
            self._wait_index()
        self._say_how_it_ended(start_step, early_stop)
        return self.state

    def _wait_index(self) -> None:
        if self.index_job is not None:
            job, self.index_job = self.index_job, None
            job.result()

    def _one_call(self) -> bool:
        """One train call, and the logs, evaluation and checkpoint due after it; True to stop early."""
        cfg, step = self.cfg, self.step
        intervals = (cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval)
        boundary = min([step - step % i + i for i in intervals] + [cfg.max_iters])
        n = min(cfg.steps_per_call, boundary - step)
        with self.timer.part("training"):
            self.state, call_metrics = self._train_call(n)
            self.unchecked.append((step, call_metrics))
            self.step += n
            # At most two calls in flight: the device never idles, the host never runs far ahead.
            self._check_finite(keep_last=1)
            self.stop.poll()  # after that wait, where a Ctrl-C most often lands: it stops after this call
        self.bar.update(n)
        at = lambda interval: self.step % interval == 0 or self.step == cfg.max_iters
        if at(cfg.log_interval):
            with self.timer.part("training"):
                self._log()
        val_loss, early_stop = None, False
        if at(cfg.eval_interval) and not self.stop():  # a pending stop saves first, skips the eval
            with self.timer.part("evaluation"):
                self._check_finite()
                val_loss = self._evaluate(self.step)
            early_stop = val_loss is not None and self._patience_ran_out(val_loss)
        best = val_loss is not None and self.ckpt.improves(val_loss)
        if at(cfg.checkpoint_interval) or self.stop() or best or early_stop:
            with self.timer.part("checkpoints"):
                self._save(val_loss)
        if val_loss is not None or at(cfg.checkpoint_interval):  # tokens/s counts training time only
            self.log_time, self.log_step, self.excluded = time.perf_counter(), self.step, 0.0
        return early_stop

    def _compile(self) -> None:
        """The train step for steps_per_call, and beside it (a thread) the eval step for each split."""
        cfg, t0 = self.cfg, time.perf_counter()
        self.jitted_train_step = make_train_step(cfg, self.model_cfg, self.mesh)
        jitted_eval_step = make_eval_step(cfg, self.model_cfg, self.mesh)
        keys = eval_keys(eval_key(cfg, 0), cfg.eval_iters)[0]
        sources = [
            d.eval_windows(keys) if isinstance(d, data.HostSplit) else d
            for d in (self.train_data, self.val_data)
        ]

        def compile_eval():
            shapes = {(s.shape, s.dtype): s for s in sources}
            return {
                shape: jitted_eval_step.lower(weights(self.state), s, keys).compile()
                for shape, s in shapes.items()
            }

        with ThreadPoolExecutor(max_workers=1) as pool:
            eval_compiled = pool.submit(compile_eval)
            n = cfg.steps_per_call
            self.compiled = {n: self._compiled_steps(n, self._train_source(n))}
            self.eval_compiled = eval_compiled.result()
        seconds = time.perf_counter() - t0
        self.timer.add("compile", seconds)
        print(f"Compiled the train step in {seconds:.2f} s", flush=True)

    def eval_step(self, params, source, keys_E):
        return self.eval_compiled[(source.shape, source.dtype)](params, source, keys_E)

    def _train_source(self, n: int):
        """What the call of steps step .. step + n - 1 reads."""
        if isinstance(self.train_data, data.HostSplit):
            return self.train_data.train_windows(self.train_key, self.step, n, self.cfg.grad_accum_steps)
        return self.train_data

    def _compiled_steps(self, n: int, source):
        return self.jitted_train_step.lower(self.state, source, n, self.hp).compile()

    def _train_call(self, n: int):
        # Shorter calls land on a boundary that is not a multiple of steps_per_call (an interval, max_iters,
        # a resumed step); each new length compiles once, which the tokens/s of its window leaves out.
        source = self._train_source(n)
        if n not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[n] = self._compiled_steps(n, source)
            self.excluded += time.perf_counter() - t0
            self.timer.add("compile", time.perf_counter() - t0)
        return self.compiled[n](self.state, source, self.hp)

    def _check_finite(self, keep_last: int = 0):
        """Read the numbers of all but the last keep_last unchecked calls; stop at a non-finite one.
        Returns the last step's numbers (when keep_last is 0 and a call was unchecked)."""
        last = None
        while len(self.unchecked) > keep_last:
            first, call_metrics = self.unchecked.pop(0)
            host = jax.device_get(call_metrics)
            bad = ~(np.isfinite(host["loss"]) & np.isfinite(host["grad_norm"]))
            if bad.any():
                i = int(np.argmax(bad))
                what = f"loss {host['loss'][i]}, gradient norm {host['grad_norm'][i]}"
                raise self._diverged(first + i + 1, what)
            last = {k: float(v[-1]) for k, v in host.items()}
        return last

    def _diverged(self, step: int, what: str) -> OrpheusError:
        self.ckpt.wait()
        good = self.ckpt.complete_steps()
        where = (
            f"the last checkpoint, step {good[-1]}, is good and nothing later was saved"
            if good
            else "no checkpoint was saved"
        )
        return OrpheusError(
            f"training diverged at step {step}: {what} (learning rate {self.lr_of(step):.3g}); {where}. "
            "Lower --config.learning_rate (or raise --config.warmup_iters, set --config.grad_clip) "
            "and run the same command to resume" + (f" from step {good[-1]}" if good else "")
        )

    def _log(self) -> None:
        cfg = self.cfg
        last = self._check_finite()  # the one sync per log_interval steps
        now = time.perf_counter()
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
        seconds = max(now - self.log_time - self.excluded, 1e-9)
        tokens_per_s = (self.step - self.log_step) * tokens_per_step / seconds
        flops = metrics_lib.flops_per_token(cfg, matmul_params(self.state.params))
        mfu = metrics_lib.mfu(tokens_per_s, flops, self.mesh.devices.flat)  # None on a CPU
        lr = self.lr_of(self.step)
        postfix = dict(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self.bar.set_postfix(**postfix, **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
        self.metrics.write(
            self.step,
            loss=last["loss"],
            grad_norm=last["grad_norm"],
            lr=lr,
            tokens_per_s=tokens_per_s,
            mfu=mfu,
        )
        self.log_time, self.log_step, self.excluded = now, self.step, 0.0

    def _evaluate(self, at_step: int) -> float | None:
        """The train and val loss estimates at this step (None if a stop request cut them short); the
        sample and the plot follow on a background thread."""
        cfg, used = self.cfg, weights(self.state)
        key_train, key_val = jax.random.split(eval_key(cfg, at_step))
        losses = {}
        for name, key, split_data in (
            ("train_loss", key_train, self.train_data),
            ("val_loss", key_val, self.val_data),
        ):
            losses[name] = estimate_loss(
                self.eval_step, used, split_data, key, cfg.eval_iters, self.stop.poll
            )
            if losses[name] is None:
                tqdm.write(f"step {at_step}: evaluation cut short by {self.stop.signal}")
                return None
        self.metrics.write(at_step, **losses, **({"lr": self.lr_of(at_step)} if at_step else {}))
        tqdm.write(
            f"step {at_step}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
        )
        if not all(map(math.isfinite, losses.values())):
            raise self._diverged(at_step, f"the evaluation loss is {losses['val_loss']}")
        self._start_report(at_step, used)
        return losses["val_loss"]

    def _start_report(self, at_step: int, used) -> None:
        """Sample and redraw the plot beside training, on process 0's first device: the weights are
        copied first (the next train call reuses their buffers), on every process (under FSDP it gathers)."""
        whole = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=replicated(self.mesh))(used)
        self._finish_report()  # the previous one's errors surface here
        if self.main:
            local = jax.tree.map(lambda x: x.addressable_shards[0].data, whole)
            self.report = self.background.submit(self._report, at_step, local)

    def _report(self, at_step: int, params) -> None:
        from orpheus_jax.sampler import Sampler

        if not hasattr(self, "sampler"):
            mesh = make_mesh(jax.local_devices()[:1])
            self.sampler = Sampler(
                self.model_cfg, params, batch_size=1, prng_impl=self.cfg.prng_impl, mesh=mesh
            )
            chars = self.tokenizer.chars
            self.sample_prompt = self.tokenizer.encode(
                "\n" if "\n" in chars else chars[0]
            )  # sample.py's default
        with self.timer.part("samples", background=True):
            self.sampler.use_params(params)
            chunks = self.sampler.generate(
                self.sample_prompt, EVAL_SAMPLE_CHARS, 0, [0], EVAL_SAMPLE_TEMPERATURE
            )
            text = self.tokenizer.decode(np.concatenate(list(chunks), axis=1))  # sample.py's seed
            self.metrics.write_text(at_step, "sample", text)
        with self.timer.part("plots", background=True):
            self.metrics.plot()

    def _finish_report(self) -> None:
        if self.report is not None:
            report, self.report = self.report, None
            with self.timer.part("waiting for samples and plots"):
                report.result()

    def _patience_ran_out(self, val_loss: float) -> bool:
        self.evals_since_best = 0 if self.ckpt.improves(val_loss) else self.evals_since_best + 1
        patience = self.cfg.early_stop_patience
        return bool(patience) and self.evals_since_best >= patience

    def _save(self, val_loss: float | None) -> None:
        self._check_finite()
        if not bool(all_finite(self.state)):
            raise self._diverged(self.step, "the parameters or optimizer state hold non-finite values")
        self.ckpt.save(self.step, self.state, val_loss)

    def _say_how_it_ended(self, start_step: int, early_stop: bool) -> None:
        step, directory = self.step, self.ckpt.directory
        best = self.ckpt.best
        if best is not None:
            print(f"Best: val loss {best[1]:.4f} at step {best[0]} (kept; sample.py --step best)", flush=True)
        if early_stop:
            print(
                f"Stopped early at step {step}: no better val loss in {self.cfg.early_stop_patience} "
                f"evaluations; checkpoints in {directory}",
                flush=True,
            )
        elif not self.stop():
            print(f"Done: step {step}; checkpoints in {directory}", flush=True)
        elif step > start_step:
            print(
                f"Stopped by {self.stop.signal} at step {step}; checkpoint saved in {directory}. "
                "Run the same command again to resume.",
                flush=True,
            )
        else:
            print(
                f"Stopped by {self.stop.signal} at step {step}, before training further: "
                "nothing new to save.",
                flush=True,
            )
        print(self.timer.summary(), flush=True)
