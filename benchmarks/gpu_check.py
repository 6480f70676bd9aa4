#!/usr/bin/env python3
"""The accelerator check: train, sample and the PyTorch reference, in one run (run by gpu_check.sh).

1. train.py with the seed recipe in bfloat16, all 5,000 steps, in a subprocess as a user runs it:
   process wall time, training time (the loop's timed intervals: no compile, evaluations or
   checkpoint waits), median tokens/s and MFU over the log lines, final val loss. Then 1,500 steps
   of it without the deterministic GPU kernels train.py asks for, for what they cost.
2. benchmarks/bench_sample.py: cached-sampler tokens/s at batch 1 and 16, 500 new tokens, for float32,
   bfloat16 and int8 weights.
3. ../shared/bench/torch_reference.py on the same device in bfloat16 autocast: `--impl seed` (the
   seed's code) and `--impl fused --compile` (what a nanoGPT user runs), training tokens/s; and the
   seed's sampler at batch 1 and 16.

Prints a table (lines starting with '# ') and then one JSON object with every figure; --json also
writes it to a file (after each step too). --smoke runs a tiny version on the CPU (for tests): the
tiny config, a few new tokens, the reference's small config without --compile, and only if torch is
importable.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOALS = {"training_s": 60.0, "x_torch_fused_compiled": 1.0, "x_torch_seed": 3.0}  # issue 8's goals


def run(cmd: list[str], env=None) -> tuple[str, float]:
    """Run a command from the repository root; returns (stdout, wall seconds); exits on failure."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(
            f"error: command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout, wall


def json_lines(text: str) -> list[dict]:
    """The JSON objects among a command's output lines (tables and progress are skipped)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def summarize_training(records: list[dict], run_config: dict) -> dict:
    """Figures of a finished train.py run from its metrics.jsonl records and config.json."""
    tokens_per_step = (
        run_config["batch_size"] * run_config["block_size"] * run_config.get("grad_accum_steps", 1)
    )
    logs = [r for r in records if r.get("tokens_per_s")]
    evals = [r for r in records if "val_loss" in r]
    training_s, previous = 0.0, 0
    for r in logs:  # each log line's tokens/s covers the training steps since the previous one
        training_s += (r["step"] - previous) * tokens_per_step / r["tokens_per_s"]
        previous = r["step"]
    mfus = [r["mfu"] for r in logs if r.get("mfu") is not None]
    return dict(
        steps=logs[-1]["step"] if logs else 0,
        training_s=training_s,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in logs) if logs else None,
        mfu=statistics.median(mfus) if mfus else None,
        final_val_loss=evals[-1]["val_loss"] if evals else None,
        final_train_loss=evals[-1]["train_loss"] if evals else None,
    )


def train_run(py: str, train_args: list[str], workdir: str | None = None, xla_flags: str | None = None):
    """train.py in a subprocess from cold caches: (its figures, its config.json)."""
    with tempfile.TemporaryDirectory(prefix="orpheus-gpu-check-") as tmp:
        workdir = workdir or os.path.join(tmp, "run")
        env = dict(os.environ, ORPHEUS_CACHE=os.path.join(tmp, "cache"))  # compile cold
        if xla_flags is not None:
            env["XLA_FLAGS"] = xla_flags
        out, wall = run([py, "train.py", *train_args, "--workdir", workdir], env=env)
        compiled = re.search(r"Compiled the train step in ([0-9.]+) s", out)
        with open(os.path.join(workdir, "config.json")) as f:
            run_config = json.load(f)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return dict(
        summarize_training(records, run_config),
        process_s=wall,
        compile_s=float(compiled.group(1)) if compiled else None,
        dtype=run_config["dtype"],
    ), run_config


def compare(figures: dict) -> dict:
    """Ratios against the PyTorch reference, and each of issue 8's goals: met, missed, or not measured."""
    jax_tok_s = figures["train"].get("tokens_per_s")
    torch = figures.get("torch_train", {})
    ratios = {f"x_torch_{name}": jax_tok_s / r["tokens_per_s"] for name, r in torch.items() if jax_tok_s}
    goals = {"training_s": figures["train"].get("training_s"), **ratios}
    verdict = {}
    for key, goal in GOALS.items():
        value = goals.get(key)
        met = None if value is None else (value < goal if key == "training_s" else value >= goal)
        verdict[key] = dict(value=value, goal=goal, met=met)
    return dict(ratios=ratios, goals=verdict)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU version of every step")
    ap.add_argument(
        "--torch_reference", default=os.path.join(REPO, "..", "shared", "bench", "torch_reference.py")
    )
    ap.add_argument("--workdir", default=None, help="the training run's directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    py = sys.executable
    data = os.environ.get("ORPHEUS_DATA") or os.path.join(REPO, "..", "shared", "data", "iliad.txt")
    figures = dict(mode="smoke" if args.smoke else "accelerator")

    def save():  # after each step too, so that a run cut off by a time limit keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)

    # Which device and software: from a subprocess, so this process never holds the accelerator.
    out, _ = run(
        [
            py,
            "-c",
            "import json, platform, jax; d = jax.devices()[0]; print(json.dumps(dict("
            "backend=jax.default_backend(), device_kind=d.device_kind, devices=jax.device_count(), "
            "jax=jax.__version__, python=platform.python_version())))",
        ]
    )
    figures["machine"] = json_lines(out)[-1]

    # 1. Training, as a user runs it; then without deterministic kernels.
    config = (
        ["--config", "configs/tiny.py", "--config.max_iters=10"]
        if args.smoke
        else ["--config", "configs/iliad_char.py", "--config.dtype=bfloat16"]
    )
    figures["train"], run_config = train_run(py, [*config, "--data", data], args.workdir)
    save()
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=false".strip()
    figures["train_nondeterministic"], _ = train_run(
        py,
        [*config, "--data", data, "--config.max_iters=" + ("10" if args.smoke else "1500")],
        xla_flags=xla_flags,
    )
    figures["deterministic_tokens_per_s_ratio"] = (
        figures["train"]["tokens_per_s"] / figures["train_nondeterministic"]["tokens_per_s"]
    )
    save()

    # 2. Sampling speed of the cached sampler (seed-sized model, random weights).
    sample_args = (
        [
            "--new",
            "4",
            "--batch",
            "1",
            "--reps",
            "1",
            "--positions",
            "10",
            "--latency_reps",
            "1",
            "--bw_mib",
            "4",
            "--naive_batch",
            "",
        ]
        if args.smoke
        else [
            "--new",
            "500",
            "--batch",
            "1,16",
            "--reps",
            "3",
            "--naive_batch",
            "1",
            "--naive_new",
            "500",
            "--weights",
            "float32,bfloat16,int8",
        ]
    )
    out, _ = run([py, "benchmarks/bench_sample.py", *sample_args])
    figures["sample"] = {
        f"{r['sampler']}_{r['weights']}_batch{r['batch']}": r["value"]
        for r in json_lines(out)
        if r.get("metric") == "tokens_per_s"
    }
    save()

    # 3. The PyTorch reference, where torch is installed.
    has_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
    if not os.path.exists(args.torch_reference) or not has_torch:
        figures["torch_skipped"] = "no torch" if not has_torch else f"no {args.torch_reference}"
    else:
        common = (
            ["--config", "small", "--device", "cpu", "--steps", "2", "--warmup", "1"]
            if args.smoke
            else ["--config", "seed", "--device", "cuda", "--amp", "bf16", "--steps", "50", "--warmup", "10"]
        )
        variants = {
            "torch_seed": ["--impl", "seed"],
            "torch_fused_compiled": ["--impl", "fused"] + ([] if args.smoke else ["--compile"]),
        }
        figures["torch_train"] = {}
        for name, extra in variants.items():
            out, _ = run(
                [py, args.torch_reference, "train", *common, *extra], env=dict(os.environ, ORPHEUS_DATA=data)
            )
            figures["torch_train"][name.removeprefix("torch_")] = json_lines(out)[-1]
            save()
        figures["torch_sample"] = {}
        gen = (
            ["--config", "small", "--device", "cpu", "--new", "8", "--reps", "1"]
            if args.smoke
            else ["--config", "seed", "--device", "cuda", "--amp", "bf16", "--new", "500", "--reps", "3"]
        )
        for batch in (1, 2) if args.smoke else (1, 16):
            out, _ = run(
                [py, args.torch_reference, "generate", *gen, "--batch", str(batch)],
                env=dict(os.environ, ORPHEUS_DATA=data),
            )
            figures["torch_sample"][f"seed_batch{batch}"] = json_lines(out)[-1]["tokens_per_s"]
            save()
    figures.update(compare(figures))

    t = figures["train"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    if args.smoke:
        print(
            "# SMOKE RUN: tiny sizes on a CPU, JAX and PyTorch on different configs: "
            "no figure or goal below means anything"
        )
    print(f"# device: {figures['machine']}")
    print(
        f"# train.py {run_config['n_layer']}x{run_config['n_head']}x{run_config['n_embd']} {t['dtype']}, "
        f"{t['steps']} steps: process {t['process_s']:.1f} s (compile {fmt(t['compile_s'], '.1f')} s), "
        f"training {t['training_s']:.1f} s, {fmt(t['tokens_per_s'], ',.0f')} tok/s (median), MFU "
        f"{fmt(t['mfu'], '.1%')}, final val loss {fmt(t['final_val_loss'], '.4f')}"
    )
    n = figures["train_nondeterministic"]
    print(
        f"# train.py without deterministic GPU kernels, {n['steps']} steps: {fmt(n['tokens_per_s'], ',.0f')} tok/s "
        f"(median); with them / without: {figures['deterministic_tokens_per_s_ratio']:.3f}"
    )
    for key, tok_s in figures["sample"].items():
        print(f"# sampling {key}: {tok_s:,.0f} tok/s")
    for name, r in figures.get("torch_train", {}).items():
        print(f"# torch reference train {name}: {r['tokens_per_s']:,.0f} tok/s")
    for key, tok_s in figures.get("torch_sample", {}).items():
        print(f"# torch reference sampling {key}: {tok_s:,.0f} tok/s")
    if "torch_skipped" in figures:
        print(f"# torch reference skipped: {figures['torch_skipped']}")
    for key, g in figures["goals"].items():
        state = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        print(
            f"# goal {key} {'<' if key == 'training_s' else '>='} {g['goal']}: {fmt(g['value'], '.3g')} ({state})"
        )
    print(json.dumps(figures))
    save()


if __name__ == "__main__":
    main()
