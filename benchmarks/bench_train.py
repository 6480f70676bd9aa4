#!/usr/bin/env python3
"""Training speed: steady-state tokens/s, model FLOP/s against a matmul peak measured in the same
run, and (with --compile) the train step's compile time with a cold and a warm compilation cache.

    python benchmarks/bench_train.py --configs seed,small --steps 10 --warmup 2
    python benchmarks/bench_train.py --configs small --set prng_impl=rbg --set steps_per_call=4 --compile

Model FLOPs per token = 6*N + 12*n_layer*n_embd*block_size, N = all parameters (embeddings
included): 6N for the forward and backward matmuls, the second term for attention's scores and
weighted sum (counted over the full T x T square, as nanoGPT/PaLM do, though half is masked).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import _common
import jax
import jax.numpy as jnp
from _common import Report, median

from configs import iliad_char  # after _common, which puts the repository on sys.path
from orpheus_jax import config as config_lib
from orpheus_jax import data, host_memory
from orpheus_jax.metrics import flops_per_token
from orpheus_jax.model import GPTConfig, count_params
from orpheus_jax.optim import hyperparams, make_optimizer
from orpheus_jax.sharding import make_mesh, replicated
from orpheus_jax.train import ONEDNN_DOTS, init_state, jaxlib_has_onednn_dots, make_train_step

# Both from the seed recipe (dropout 0.2); `small` is the torch reference's small config.
PRESETS = {
    "seed": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32),
}
INTERVAL_KEYS = ("max_iters", "eval_interval", "checkpoint_interval", "log_interval")


def make_config(name: str, assignments: list[str]):
    cfg = iliad_char.get_config()
    cfg.update(PRESETS[name])
    overrides = _common.apply_overrides(cfg, assignments)
    # Intervals rounded up to multiples of steps_per_call, so that no call is shortened (another compile).
    spc = cfg.steps_per_call
    for key in INTERVAL_KEYS:
        cfg[key] = -(-cfg[key] // spc) * spc
    config_lib.validate(cfg)
    return cfg, overrides


def bench_steady_state(cfg, tokens, vocab_size: int, n_steps: int, warmup_calls: int):
    """(n_params, in-process compile seconds, seconds per optimizer step for each timed call)."""
    mesh = make_mesh()
    rep = replicated(mesh)
    model_cfg = GPTConfig.from_run_config(cfg, vocab_size)
    optimizer = make_optimizer(cfg)
    train_tokens, _ = data.split(tokens, cfg.val_fraction, cfg.block_size)
    train_data = jax.device_put(train_tokens, rep)
    state = jax.jit(lambda: init_state(cfg, model_cfg, optimizer), out_shardings=rep)()
    n_params = count_params(state.params)

    hp = hyperparams(cfg)
    t0 = time.perf_counter()
    train_step = (
        make_train_step(cfg, model_cfg, mesh).lower(state, train_data, cfg.steps_per_call, hp).compile()
    )
    compile_s = time.perf_counter() - t0

    def call():
        nonlocal state  # the step donates the state: keep only the newest
        state, metrics = train_step(state, train_data, hp)
        jax.block_until_ready(metrics)

    calls = max(1, -(-n_steps // cfg.steps_per_call))  # whole calls covering n_steps optimizer steps
    times = _common.time_calls(call, calls, warmup=warmup_calls)
    return n_params, compile_s, [t / cfg.steps_per_call for t in times]


def bench_compile(name: str, cfg, overrides: dict) -> dict:
    """Run train.py twice on one fresh ORPHEUS_CACHE: the first compiles cold, the second from the cache."""
    spc = cfg.steps_per_call
    settings = dict(
        PRESETS[name],
        **overrides,
        max_iters=spc,
        eval_iters=1,
        eval_interval=spc,
        log_interval=spc,
        checkpoint_interval=spc,
    )
    result = {}
    with tempfile.TemporaryDirectory(prefix="orpheus-bench-") as tmp:
        env = dict(os.environ, ORPHEUS_CACHE=os.path.join(tmp, "cache"))
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # else JAX's cache is the user's, warm
        for run in ("cold", "warm"):  # a new workdir each time, so the second run trains rather than resumes
            cmd = [
                sys.executable,
                "train.py",
                "--config",
                "configs/iliad_char.py",
                "--data",
                _common.data_path(),
                "--workdir",
                os.path.join(tmp, f"run_{run}"),
            ] + [f"--config.{k}={v}" for k, v in settings.items()]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=_common.REPO, env=env, capture_output=True, text=True)
            process_s = time.perf_counter() - t0
            found = re.search(r"Compiled the train step in ([0-9.]+) s", proc.stdout)
            if proc.returncode != 0 or not found:
                sys.exit(
                    f"train.py failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-2000:]}"
                )
            result[run] = (float(found.group(1)), process_s)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="seed,small", help="comma-separated: seed, small")
    ap.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed optimizer steps per config, rounded up to whole calls of steps_per_call",
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of each matmul")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every config, e.g. dtype=bfloat16 (repeatable)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="also time train.py's compile, cold and warm cache"
    )
    args = ap.parse_args()
    names = args.configs.split(",")
    for name in names:
        if name not in PRESETS:
            ap.error(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")

    host_memory.keep_freed_memory()  # as train.py
    report = Report("train", **_common.machine_info())
    peak = {}
    # The peak is the better of XLA's default dot library and oneDNN (cpu_dots), so no setting flatters
    # itself.
    libraries = {"xla": {}, "onednn": ONEDNN_DOTS} if jaxlib_has_onednn_dots() else {"xla": {}}
    for dtype in (jnp.float32, jnp.bfloat16):
        for library, options in libraries.items():
            samples = [f / 1e9 for f in _common.matmul_flops(dtype, reps=args.reps, compiler_options=options)]
            peak[dtype.dtype.name] = max(peak.get(dtype.dtype.name, 0), median(samples) * 1e9)
            report.add(
                "matmul_gflops",
                median(samples),
                "GFLOP/s",
                dict(config="matmul2048", dtype=dtype.dtype.name, dots=library),
                samples,
                note="jitted jnp.dot 2048^3, float32 accumulate",
            )

    tokenizer, tokens = _common.load_corpus()
    for name in names:
        cfg, overrides = make_config(name, args.set)
        labels = dict(
            config=name,
            dtype=cfg.dtype,
            prng_impl=cfg.prng_impl,
            dropout_rng=cfg.dropout_rng,
            steps_per_call=cfg.steps_per_call,
            cpu_dots=cfg.cpu_dots,
        )
        extra = dict(
            overrides=overrides, batch_size=cfg.batch_size, block_size=cfg.block_size, dropout=cfg.dropout
        )
        n_params, compile_s, step_s = bench_steady_state(
            cfg, tokens, tokenizer.vocab_size, args.steps, args.warmup
        )
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps
        fpt = flops_per_token(cfg, n_params)
        tok_s = [tokens_per_step / s for s in step_s]
        report.add("params", n_params, "", labels, **extra)
        report.add("step_s", median(step_s), "s", labels, step_s, **extra)
        report.add("tokens_per_s", median(tok_s), "tok/s", labels, tok_s, **extra)
        model_gflops = median(tok_s) * fpt / 1e9
        report.add(
            "model_gflops",
            model_gflops,
            "GFLOP/s",
            labels,
            flops_per_token=fpt,
            note="tokens/s * (6N + 12*n_layer*n_embd*block_size)",
            **extra,
        )
        report.add("frac_of_f32_matmul_peak", model_gflops * 1e9 / peak["float32"], "", labels, **extra)
        if cfg.dtype == "bfloat16":
            report.add("frac_of_bf16_matmul_peak", model_gflops * 1e9 / peak["bfloat16"], "", labels, **extra)
        report.add(
            "compile_s_in_process", compile_s, "s", labels, note="lower+compile, no persistent cache", **extra
        )
        if args.compile:
            runs = bench_compile(name, cfg, overrides)
            for run, (compile_run_s, process_s) in runs.items():
                report.add(
                    f"compile_s_{run}",
                    compile_run_s,
                    "s",
                    labels,
                    note="train.py 'Compiled the train step'",
                    **extra,
                )
                report.add(
                    f"train_py_process_s_{run}",
                    process_s,
                    "s",
                    labels,
                    note=f"whole train.py run of {cfg.steps_per_call} step(s)",
                    **extra,
                )
    report.print()


if __name__ == "__main__":
    main()
