#!/usr/bin/env python3
"""The quick start as a user feels it: validation loss against wall-clock, from launching train.py.

    python benchmarks/bench_quickstart.py [-- --config.max_iters=1300 --config.learning_rate=4e-3]

Runs `train.py --workdir <fresh temporary dir, or --workdir> [extra args]` (the default config for this
machine unless the extra args name one) as a new process, with the clock started just before the launch,
and timestamps each evaluation line ("step S: train loss A, val loss B") as it arrives on stdout.
Prints one row per evaluation and the process's total wall time; `--budget S` adds the last val
loss reached within S seconds. The persistent caches ($ORPHEUS_CACHE) are whatever the environment
gives: set ORPHEUS_CACHE to an empty directory for a cold start.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import _common

EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", type=float, default=315.0, help="seconds: report the val loss reached by then"
    )
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--workdir", help="a new directory to keep the run in (default: a temporary one)")
    parser.add_argument("train_args", nargs="*", help="after --: arguments for train.py")
    args = parser.parse_args()
    if args.workdir and os.path.exists(args.workdir):
        sys.exit(f"error: {args.workdir} exists: the quick start is timed from a new run")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or os.path.join(tmp, "run")
        cmd = [
            sys.executable,
            "-u",
            os.path.join(_common.REPO, "train.py"),
            "--workdir",
            workdir,
            "--data",
            _common.data_path(),
            *args.train_args,
        ]
        t0 = time.perf_counter()  # the progress bar stays off: its output is a pipe, not a terminal
        proc = subprocess.Popen(
            cmd, cwd=_common.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        evals = []
        for line in proc.stdout:
            now = time.perf_counter() - t0
            print(f"{now:7.1f} s  {line.rstrip()}", file=sys.stderr, flush=True)
            if m := EVAL_LINE.search(line):
                evals.append((now, int(m[1]), float(m[2]), float(m[3])))
        rc = proc.wait()
        total = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"error: train.py exited with {rc}")

    print(f"# train.py {' '.join(args.train_args)}")
    print("# seconds  step  train loss  val loss")
    for now, step, train_loss, val_loss in evals:
        print(f"# {now:7.1f} {step:5d} {train_loss:10.4f} {val_loss:9.4f}")
    within = [e for e in evals if e[0] <= args.budget]
    print(
        f"# process wall time {total:.1f} s; last val loss within {args.budget:.0f} s: "
        f"{within[-1][3] if within else float('nan'):.4f}"
    )
    common = {"bench": "quickstart", "label": args.label, "train_args": args.train_args}
    for now, step, _train_loss, val_loss in evals:
        print(
            json.dumps(
                {**common, "metric": "val_loss", "step": step, "seconds": round(now, 1), "value": val_loss}
            )
        )
    print(json.dumps({**common, "metric": "process_s", "value": round(total, 1), "unit": "s"}))


if __name__ == "__main__":
    main()
