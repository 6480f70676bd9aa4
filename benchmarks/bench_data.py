"""A corpus beyond device memory: train.py on a generated text of about 1 GB against the Iliad.

    python benchmarks/bench_data.py --text /tmp/orpheus-1gb.txt --size 1e9 --steps 100 --reps 2

Makes the text if it is missing (the Iliad's paragraphs, shuffled with a fixed seed, until --size
bytes; never inside the repository), then runs train.py (the CPU preset, fresh workdirs) in
subprocesses and timestamps their output lines:
  - first run, empty ORPHEUS_CACHE: tokenization (the "Tokenized in" line), peak RSS;
  - second run, same cache: start-up = process start to the summary line (data ready) and to
    "Compiled the train step"; peak RSS;
  - tokens/s of the big text (train split batched on the host) against the Iliad (on the device),
    the same config, runs alternating (big, Iliad, big, Iliad, ...): medians of metrics.jsonl's
    tokens_per_s after the first log line.
Peak RSS is the child's ru_maxrss (os.wait4). Progress goes to stderr, the table and JSON to stdout.
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import _common

CONFIG = os.path.join(_common.REPO, "configs", "iliad_char_cpu.py")


def make_text(path: str, size: float) -> None:
    with open(_common.data_path(), encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    rng, written = random.Random(0), 0
    with open(path + ".part", "w", encoding="utf-8") as out:
        while written < size:
            rng.shuffle(paragraphs)
            for p in paragraphs:
                out.write(p + "\n\n")
                written += len(p) + 2
                if written >= size:
                    break
    os.replace(path + ".part", path)


def run_train(data: str, workdir: str, cache: str, overrides: list[str]) -> dict:
    """One train.py process: {line prefix: seconds after launch}, peak RSS (bytes), wall seconds, stdout."""
    cmd = [sys.executable, "train.py", "--config", CONFIG, "--data", data, "--workdir", workdir, *overrides]
    env = dict(os.environ, ORPHEUS_CACHE=cache)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=_common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        seen.setdefault(
            line.split(" ")[0] if "parameters, vocab" not in line else "summary", time.perf_counter() - t0
        )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"train.py failed: {' '.join(cmd)}\n{''.join(lines[-20:])}")
    print(
        f"[data] {os.path.basename(data)}: {wall:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB",
        file=sys.stderr,
        flush=True,
    )
    return dict(times=seen, rss=usage.ru_maxrss * 1024, wall=wall, stdout="".join(lines))


def tokens_per_s(workdir: str) -> list[float]:
    from orpheus_jax.metrics import read_jsonl

    return [
        r["tokens_per_s"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "tokens_per_s" in r
    ][1:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="/tmp/orpheus-1gb.txt", help="the big text (made if missing)")
    ap.add_argument("--size", type=float, default=1e9, help="bytes of the big text, when making it")
    ap.add_argument("--steps", type=int, default=100, help="training steps per run (a multiple of 5)")
    ap.add_argument("--reps", type=int, default=2, help="big/Iliad pairs of training runs")
    args = ap.parse_args()
    if not os.path.exists(args.text):
        print(f"[data] making {args.text}", file=sys.stderr, flush=True)
        make_text(args.text, args.size)
    text_bytes = os.path.getsize(args.text)
    overrides = [
        f"--config.max_iters={args.steps}",
        f"--config.eval_interval={args.steps}",
        f"--config.checkpoint_interval={args.steps}",
        "--config.eval_iters=5",
    ]
    report = _common.Report("data", **_common.machine_info(), text_bytes=text_bytes, steps=args.steps)
    with tempfile.TemporaryDirectory(prefix="orpheus-bench-data-") as tmp:
        cache = os.path.join(tmp, "cache")
        first = run_train(args.text, os.path.join(tmp, "first"), cache, overrides)
        tokenized = [line for line in first["stdout"].splitlines() if line.startswith("Tokenized in")][0]
        seconds = float(tokenized.split("Tokenized in ")[1].split(" s")[0])
        token_file = max(
            (os.path.join(cache, "tokens", f) for f in os.listdir(os.path.join(cache, "tokens"))),
            key=os.path.getsize,
        )
        report.add("tokenize_mb_per_s", text_bytes / 1e6 / seconds, "MB/s", {"run": "first"}, seconds=seconds)
        report.add(
            "peak_rss_x_token_file",
            first["rss"] / os.path.getsize(token_file),
            "x",
            {"run": "first"},
            rss_bytes=first["rss"],
            token_file_bytes=os.path.getsize(token_file),
        )
        big, iliad = [], []
        for rep in range(args.reps):
            second = run_train(args.text, os.path.join(tmp, f"big{rep}"), cache, overrides)
            big += tokens_per_s(os.path.join(tmp, f"big{rep}"))
            if rep == 0:
                report.add("startup_to_data_ready_s", second["times"]["summary"], "s", {"run": "second"})
                report.add("startup_to_compiled_s", second["times"]["Compiled"], "s", {"run": "second"})
                report.add(
                    "peak_rss_x_token_file",
                    second["rss"] / os.path.getsize(token_file),
                    "x",
                    {"run": "second"},
                    rss_bytes=second["rss"],
                )
            small = run_train(_common.data_path(), os.path.join(tmp, f"iliad{rep}"), cache, overrides)
            iliad += tokens_per_s(os.path.join(tmp, f"iliad{rep}"))
            if rep == 0:
                report.add("peak_rss_bytes", small["rss"], "B", {"run": "iliad"})
    report.add("tokens_per_s", statistics.median(big), "tok/s", {"text": "big (host batches)"}, samples=big)
    report.add(
        "tokens_per_s", statistics.median(iliad), "tok/s", {"text": "iliad (on device)"}, samples=iliad
    )
    report.add("big_vs_iliad", statistics.median(big) / statistics.median(iliad), "x", {})
    report.print()


if __name__ == "__main__":
    main()
