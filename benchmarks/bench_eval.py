#!/usr/bin/env python3
"""What one evaluation costs (the train and val estimates of a run), before and after issue 20.

    python benchmarks/bench_eval.py [--config iliad_char_cpu] [--reps 5] [-- --config.KEY=VALUE ...]

"before": 10 batches per jitted call, one batch per forward pass (the loop's old EVAL_CHUNK);
"one_per_pass": up to 40 batches per call, one per forward pass (train.py on CPUs); "grouped": up to 40
a call, EVAL_GROUP per forward pass (train.py on GPUs and TPUs). The same keys draw the same windows in
all three, so the estimates agree (printed). Each figure is the median of
--reps timed evaluations after one untimed (compile) run; the modes alternate.
"""

import argparse
import importlib
import json
import statistics
import time

import _common
import jax

from orpheus_jax import data, train
from orpheus_jax.model import GPTConfig, init_params
from orpheus_jax.sharding import make_mesh


def evaluation(cfg, model_cfg, mesh, params, splits, per_call: int, group: int):
    """A function running one evaluation (both splits) with these batch groupings, and its result."""
    train.EVAL_CALL_BATCHES = per_call
    step = train.make_eval_step(cfg, model_cfg, mesh, group)

    def run():
        key_train, key_val = jax.random.split(train.eval_key(cfg, 0))
        return [
            train.estimate_loss(step, params, split, key, cfg.eval_iters)
            for split, key in zip(splits, (key_train, key_val))
        ]

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="iliad_char_cpu", help="a shipped config's name")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="after --: --config.KEY=VALUE")
    args = ap.parse_args()
    cfg = importlib.import_module(f"orpheus_jax.configs.{args.config}").get_config()
    _common.apply_overrides(cfg, [a.removeprefix("--config.") for a in args.overrides])
    tokenizer, tokens = _common.load_corpus()
    mesh = make_mesh()
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    params = init_params(model_cfg, jax.random.key(0))
    splits = [data.to_device(part, mesh) for part in data.split(tokens, cfg.val_fraction, cfg.block_size)]
    modes = {
        "before": (10, 1),
        "one_per_pass": (train.EVAL_CALL_BATCHES, 1),
        "grouped": (train.EVAL_CALL_BATCHES, train.EVAL_GROUP),
    }
    runs = {
        name: evaluation(cfg, model_cfg, mesh, params, splits, *grouping) for name, grouping in modes.items()
    }
    estimates = {name: run() for name, run in runs.items()}  # compiles
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            train.EVAL_CALL_BATCHES = modes[name][0]
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"# {args.config} {' '.join(args.overrides)}: eval_iters {cfg.eval_iters} x batch {cfg.batch_size}, "
        f"{mesh.devices.size} {jax.default_backend()} device(s)"
    )
    for name in runs:
        print(
            f"# {name}: {medians[name]:.3f} s an evaluation (median of {args.reps}), "
            f"estimates {estimates[name]}"
        )
    for name in ("one_per_pass", "grouped"):
        print(f"# {name} / before: {medians[name] / medians['before']:.2f}")
    print(
        json.dumps(
            dict(
                config=args.config,
                overrides=args.overrides,
                times=times,
                medians=medians,
                estimates=estimates,
                machine=_common.machine_info(),
            )
        )
    )


if __name__ == "__main__":
    main()
