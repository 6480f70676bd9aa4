#!/usr/bin/env python3
"""Start-up of sample.py: the time from launching the process to the first byte on its stdout and
to the first generated character, read from a timestamped stream of its output.

    python benchmarks/bench_startup.py --workdir runs/iliad_char_cpu --reps 5

Each repetition runs `sample.py --workdir W --stream --prompt P --max_new_tokens N [extra args]` as a
new process (the same interpreter as this script); the clock starts just before the process is
launched and stops when the bytes arrive through the pipe. `--stream` writes the prompt first, so
`first_byte_s` is when the prompt appears and `first_char_s` when the first character after it
arrives; `cpu_first_char_s` and `cpu_s` are the CPU time (user + system) the process had used then
and in all: on a loaded machine, where the wall clock mostly waits for a core, they show what a quiet
one would take. The first run fills the caches (the compiled
programs and parameters sample.py keeps) and is not counted; `--cold` starts it from an empty
$ORPHEUS_CACHE and reports it too.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import _common  # puts the repository on sys.path; imports jax, which the child does not share
from _common import Report, median


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far (Linux /proc), or NaN where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def timed_run(cmd: list[str], prompt: bytes) -> dict:
    """Launch cmd; return seconds to its first stdout byte, to its first byte after `prompt`, and to
    exit, and the CPU time it used (user + system: what load on a shared machine inflates least)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=_common.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    out, first_byte, first_char, cpu_first_char = b"", None, None, None
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        now = time.perf_counter() - t0
        if not chunk:
            break
        out += chunk
        if first_byte is None:
            first_byte = now
        if first_char is None and len(out) > len(prompt):
            first_char, cpu_first_char = now, cpu_seconds(proc.pid)
    stderr = proc.stderr.read()
    proc.wait()
    exit_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or first_char is None:
        sys.exit(f"sample.py failed ({proc.returncode}): {' '.join(cmd)}\n{stderr.decode()[-2000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(
        first_byte_s=first_byte,
        first_char_s=first_char,
        exit_s=exit_s,
        cpu_first_char_s=cpu_first_char,
        cpu_s=cpu_s,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a trained run (train.py's --workdir)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs after the one that warms the cache")
    ap.add_argument("--prompt", default="Achilles")
    ap.add_argument("--max_new_tokens", type=int, default=300)
    ap.add_argument(
        "--cold",
        action="store_true",
        help="start from an empty compilation cache (a fresh $ORPHEUS_CACHE) and report that run too",
    )
    ap.add_argument("extra", nargs="*", help="more sample.py arguments, after --, e.g. -- --weights int8")
    args = ap.parse_args()
    cmd = [
        sys.executable,
        "sample.py",
        "--workdir",
        os.path.abspath(args.workdir),
        "--stream",
        "--prompt",
        args.prompt,
        "--max_new_tokens",
        str(args.max_new_tokens),
    ] + args.extra
    report = Report("startup", **_common.machine_info())
    labels = dict(args=" ".join(args.extra) or "(defaults)", new=args.max_new_tokens)
    notes = {
        "first_byte_s": "launch to the first stdout byte (the prompt)",
        "first_char_s": "launch to the first generated character",
        "exit_s": "launch to exit",
        "cpu_first_char_s": (
            "user + system CPU time of the process when its first generated character arrives"
        ),
        "cpu_s": "user + system CPU time of the whole process",
    }
    with tempfile.TemporaryDirectory(prefix="orpheus-startup-") as tmp:
        if args.cold:  # a fresh cache: no compiled programs, no kept samplers
            os.environ["ORPHEUS_CACHE"] = tmp
            os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        first = timed_run(cmd, args.prompt.encode())
        runs = [timed_run(cmd, args.prompt.encode()) for _ in range(args.reps)]
    if args.cold:
        for metric, value in first.items():
            report.add(f"cold_{metric}", value, "s", labels, note=notes[metric])
    for metric in runs[0]:
        samples = [r[metric] for r in runs]
        report.add(metric, median(samples), "s", labels, samples, note=notes[metric])
    report.print()


if __name__ == "__main__":
    main()
