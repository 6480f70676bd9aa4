#!/usr/bin/env python3
"""The model options against the clock: the CPU preset's shape trained with each option alone, and a
combination, for the same training-time budget and several seeds; validation loss against time.

    python benchmarks/ablate.py --budget_s 150 --seeds 1,2
    python benchmarks/ablate.py --options muon --muon_lrs 0.01,0.02,0.04 --seeds 1,2     # Muon's rates
    python benchmarks/ablate.py --budget_s 20 --seeds 1 --options baseline,rope           # a smoke run

Every run is `train.py --config iliad_char_cpu` in a subprocess of its own, one at a time, in a fresh
workdir, with `--config.seed=S` and the option's keys (`--set KEY=VALUE` adds keys to every run).

The budget is training time: the seconds train.py's loop spends in train steps, as its own tokens/s
windows count them (metrics.jsonl). Compilation is once per process and mostly cached; evaluations
are the same for every option and scheduled here; so neither is charged to an option. An option that
makes a step dearer (Muon's orthogonalization, the average of EMA) gets fewer steps.

The schedule ends at the budget. A time cap (stopping a run when the budget runs out) would cut the
cosine short, unevenly across options, and compare unannealed weights; instead a timing run of
`--timing_steps` steps per option measures its steps per second (the median of its later log
windows), and the timed runs get max_iters = budget x that rate, with the preset's warmup fraction
and `--evals` evaluations evenly spaced. What each run really spent is printed beside it (`train_s`),
so a machine that got busier or quieter in between shows.

Caches: all runs share one `ORPHEUS_CACHE` (`--cache DIR`, default a fresh temporary directory), so
the timing runs start cold and fill it (token file, eval step, sampler programs) and the timed runs
start warm. The train step itself holds the schedule, so each option's first timed run compiles it and
its later seeds find it cached (except with `cpu_dots=onednn`, never cached); none of it is in `train_s`.
Runs go seed by seed, every option in turn (A B C A B C), to spread the machine's drift over the options.

Output: progress (the children's lines, timestamped) on stderr; then a table, lines starting with `# `
(option, seed, val loss at each evaluation, final val, steps, tokens/s, train_s, process seconds),
the mean final val per option, and JSON lines: one per evaluation and one per run.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _common

from orpheus_jax.configs import iliad_char_cpu  # after _common, which puts the repository on sys.path

EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
CONFIG = "iliad_char_cpu"
_PRESET = iliad_char_cpu.get_config()
PRESET_WARMUP_FRACTION = _PRESET.warmup_iters / _PRESET.max_iters
# Steps between log lines: the preset's steps_per_call, so a log line ends every call (whose numbers the
# loop reads anyway) and every evaluation falls on one: the windows then cover every training step.
LOG_INTERVAL = 5

# The baseline is the preset's shape with the seed's choices (the preset itself adopted some options);
# every run starts from these keys, then sets its options'.
SEED_CHOICES = {"pos_encoding": "learned", "mlp_activation": "relu", "qk_norm": False, "optimizer": "adamw"}
# Each option alone, as the config keys it sets (Muon's rate from --muon_lrs).
OPTIONS = {
    "baseline": {},
    "relu2": {"mlp_activation": "relu2"},
    "gelu": {"mlp_activation": "gelu"},
    "qk_norm": {"qk_norm": True},
    "rope": {"pos_encoding": "rope"},
    "zero_init_proj": {"zero_init_proj": True},
    "ema": {"ema_decay": "auto"},  # see --ema_decay
    "muon": {"optimizer": "muon"},
}
DEFAULT_COMBO = "relu2,qk_norm,rope,zero_init_proj,ema"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget_s", type=float, default=150.0, help="training seconds per run")
    p.add_argument("--seeds", default="1,2", help="comma-separated config seeds")
    p.add_argument(
        "--options",
        default=",".join([*OPTIONS, "combo"]),
        help=f"comma-separated, of {', '.join(OPTIONS)}, combo (default: all)",
    )
    p.add_argument("--combo", default=DEFAULT_COMBO, help="the options the `combo` run combines")
    p.add_argument(
        "--muon_lrs", default="", help="Muon's peak rates, one `muon` run each (default: the config's)"
    )
    p.add_argument(
        "--ema_decay",
        default="auto",
        help="for `ema`: a decay, or auto = 1 - 10 / max_iters (an average over about the last tenth)",
    )
    p.add_argument("--evals", type=int, default=5, help="evaluations per run, evenly spaced")
    p.add_argument("--timing_steps", type=int, default=60, help="steps of each option's timing run")
    p.add_argument("--cache", help="ORPHEUS_CACHE for every run (default: a fresh temporary directory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key, every run")
    p.add_argument("--keep", help="keep each run's workdir under this directory")
    args = p.parse_args(argv)
    args.seeds = _common.parse_list(args.seeds)
    args.options = [o for o in args.options.split(",") if o]
    args.combo = [o for o in args.combo.split(",") if o]
    args.muon_lrs = _common.parse_list(args.muon_lrs, float) or [None]
    unknown = sorted(set(args.options + args.combo) - set(OPTIONS) - {"combo"})
    if unknown or "combo" in args.combo:
        p.error(f"unknown option(s): {', '.join(unknown or ['combo'])}")
    if {"relu2", "gelu"} <= set(args.combo):
        p.error("--combo: relu2 and gelu are two values of one key (mlp_activation)")
    return args


def runs_of(args) -> list[tuple[str, str, dict]]:
    """(label, timing key, config keys) of every run of one seed. The timing key groups runs whose steps
    cost the same: Muon's rates share one timing run."""
    runs = []
    for option in args.options:
        members = args.combo if option == "combo" else [option]
        keys = {k: v for m in members for k, v in OPTIONS[m].items()}
        if "muon" in members:
            for lr in args.muon_lrs:
                lr_keys = {} if lr is None else {"muon_learning_rate": lr}
                label = option if lr is None else f"{option}@{lr:g}"
                runs.append((label, option, {**keys, **lr_keys}))
        else:
            runs.append((option, option, keys))
    return runs


def train_args(keys: dict, extra: list[str]) -> list[str]:
    return [f"--config.{key}={value}" for key, value in keys.items()] + [f"--config.{a}" for a in extra]


def launch(workdir: str, keys: dict, extra: list[str], cache: str, label: str):
    """Run train.py to the end; returns (eval lines as (wall_s, step, train loss, val loss), wall seconds)."""
    cmd = [
        sys.executable, "-u", os.path.join(_common.REPO, "train.py"), "--config", CONFIG,
        "--workdir", workdir, "--data", _common.data_path(), *train_args({**SEED_CHOICES, **keys}, extra),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=_common.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ORPHEUS_CACHE": cache},
    )  # fmt: skip
    evals, tail = [], []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        print(f"[{label}] {now:7.1f} s  {line.rstrip()}", file=sys.stderr, flush=True)
        tail = (tail + [line.rstrip()])[-5:]
        if m := EVAL_LINE.search(line):
            evals.append((now, int(m[1]), float(m[2]), float(m[3])))
    if proc.wait() != 0:
        sys.exit(f"error: train.py ({label}) exited with {proc.returncode}: {' | '.join(tail)}")
    return evals, time.perf_counter() - t0


def train_windows(workdir: str) -> list[tuple[int, int, float]]:
    """(step at its end, steps, training seconds) of each window of train.py's log lines (metrics.jsonl):
    a window starts at the previous line, a log line or an evaluation (whose time it leaves out)."""
    tokens_per_step = _tokens_per_step(workdir)
    windows, last_step = [], 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("tokens_per_s"):
                steps = record["step"] - last_step
                windows.append((record["step"], steps, steps * tokens_per_step / record["tokens_per_s"]))
            last_step = record["step"]
    return windows


def _tokens_per_step(workdir: str) -> int:
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    return saved["batch_size"] * saved["block_size"] * saved["grad_accum_steps"]


def resolve(args, keys: dict, max_iters: int) -> dict:
    """The run's keys with ema_decay "auto" made a number: --ema_decay, or 1 - 10 / max_iters."""
    if keys.get("ema_decay") != "auto":
        return keys
    decay = 1 - 10 / max_iters if args.ema_decay == "auto" else float(args.ema_decay)
    return {**keys, "ema_decay": round(min(max(decay, 0.0), 0.9999), 6)}


def steps_per_second(args, keys: dict, label: str, scratch: str) -> float:
    """The option's training steps per second, from a short run: the median of its log windows' rates
    over the last two thirds (in the first, the evaluation at step 0 compiles and runs the sampler
    beside training)."""
    workdir = os.path.join(scratch, f"timing-{label}")
    n = max(3 * LOG_INTERVAL, args.timing_steps // LOG_INTERVAL * LOG_INTERVAL)
    timing = dict(
        max_iters=n, eval_interval=n, checkpoint_interval=n, eval_iters=1, log_interval=LOG_INTERVAL
    )
    launch(workdir, {**resolve(args, keys, n), **timing}, args.set, args.cache, f"timing {label}")
    windows = train_windows(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return statistics.median(steps / seconds for _, steps, seconds in windows[len(windows) // 3 :])


def schedule(args, rate: float) -> dict:
    """max_iters for the budget at `rate` steps/s, evaluations evenly spaced, the preset's warmup share."""
    interval = max(LOG_INTERVAL, round(args.budget_s * rate / args.evals / LOG_INTERVAL) * LOG_INTERVAL)
    max_iters = interval * args.evals
    return dict(
        max_iters=max_iters, eval_interval=interval, checkpoint_interval=max_iters,
        warmup_iters=max(1, round(PRESET_WARMUP_FRACTION * max_iters)), log_interval=LOG_INTERVAL,
    )  # fmt: skip


def timed_run(args, label: str, seed: int, keys: dict, plan: dict, scratch: str) -> dict:
    """One run of the ablation: its evaluations against training and wall seconds, and its speed."""
    workdir = os.path.join(args.keep or scratch, f"{label}-seed{seed}")
    keys = resolve(args, keys, plan["max_iters"])
    evals, wall = launch(
        workdir, {**keys, **plan, "seed": seed}, args.set, args.cache, f"{label} seed {seed}"
    )
    windows = train_windows(workdir)
    tokens = plan["max_iters"] * _tokens_per_step(workdir)
    points = [
        dict(
            step=step,
            train_s=round(sum(s for end, _, s in windows if end <= step), 1),
            wall_s=round(wall_s, 1),
            train_loss=train_loss,
            val_loss=val_loss,
        )
        for wall_s, step, train_loss, val_loss in evals
    ]
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    train_s = sum(s for _, _, s in windows)
    return dict(
        option=label, seed=seed, keys=keys, evals=points, final_val=points[-1]["val_loss"],
        steps=plan["max_iters"], tokens_per_s=round(tokens / train_s), train_s=round(train_s, 1),
        process_s=round(wall, 1),
    )  # fmt: skip


def report(args, results: list[dict], rates: dict) -> None:
    n = args.evals
    header = ["seed", *(f"val@{args.budget_s * (i + 1) / n:.0f}s" for i in range(n))]
    header += ["final", "steps", "tok/s", "train_s", "proc_s"]
    print(f"# ablate: {CONFIG}, {args.budget_s:g} s of training per run, seeds {args.seeds}, set {args.set}")
    print(f"# {'option':<20} " + " ".join(f"{h:>9}" for h in header))
    for r in results:
        cells = [r["seed"], *(f"{p['val_loss']:.4f}" for p in r["evals"] if p["step"] > 0)]
        cells += [f"{r['final_val']:.4f}", r["steps"], f"{r['tokens_per_s']:,}", r["train_s"], r["process_s"]]
        print(f"# {r['option']:<20} " + " ".join(f"{c:>9}" for c in cells))
    print("# mean final val over the seeds (min .. max); steps/s of the option's timing run")
    for label in dict.fromkeys(r["option"] for r in results):
        finals = [r["final_val"] for r in results if r["option"] == label]
        rate = rates[next(r["timing"] for r in results if r["option"] == label)]
        spread = f"{min(finals):.4f} .. {max(finals):.4f}"
        print(f"# {label:<20} {statistics.mean(finals):.4f} ({spread}); {rate:.2f} steps/s")
    common = dict(
        bench="ablate", config=CONFIG, budget_s=args.budget_s, set=args.set, **_common.machine_info()
    )
    for r in results:
        for p in r["evals"]:
            print(json.dumps(dict(common, option=r["option"], seed=r["seed"], metric="val_loss", **p)))
        summary = {k: v for k, v in r.items() if k != "evals"}
        print(json.dumps(dict(common, metric="run", steps_per_s_timing=rates[r["timing"]], **summary)))


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        args.cache = args.cache or os.path.join(scratch, "cache")
        runs, rates = runs_of(args), {}
        for _, timing_key, keys in runs:
            if timing_key not in rates:
                rates[timing_key] = steps_per_second(args, keys, timing_key, scratch)
                print(f"[ablate] {timing_key}: {rates[timing_key]:.2f} steps/s", file=sys.stderr, flush=True)
        results = []
        for seed in args.seeds:
            for label, timing_key, keys in runs:
                plan = schedule(args, rates[timing_key])
                result = timed_run(args, label, seed, keys, plan, scratch)
                results.append(dict(result, timing=timing_key))
    report(args, results, rates)


if __name__ == "__main__":
    main()
