#!/usr/bin/env python3
"""The accelerator check: training, its variants, exactness, sampling and the PyTorch reference, in one
run (run by gpu_check.sh; one lease of a GPU machine).

1. train.py with the seed recipe in bfloat16, all 5,000 steps, today's defaults, cold caches, in a
   subprocess as a user runs it: launch-to-done seconds, training seconds (the loop's timed
   intervals), the run's own time breakdown (its last line), median tokens/s and MFU, final and best
   val loss.
2. Variants, --variant_steps each (tokens/s from their log lines): the embedding as a lookup with and
   without XLA's deterministic GPU kernels (the defaults before issue 20), the Pallas attention.
3. --options: the seed recipe with the model options issue 22 chose, all 5,000 steps: best val loss.
4. Exactness on the device: pytest's resume test (no deterministic-ops flag) and the Pallas kernel's.
5. benchmarks/bench_sample.py: characters/s at batch 1, with and without drafts.
6. ../shared/bench/torch_reference.py on the same device in bfloat16 autocast: `--impl seed` and
   `--impl fused --compile`, training tokens/s.

Prints a table (lines starting with '# ') and one JSON object with every figure; --json writes it to
a file after each step too, so a run cut off keeps what it measured. --smoke runs a tiny version of
every step on the CPU (for tests): no figure of it means anything.
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
GOALS = {"training_s": 45.0, "process_s": 75.0, "x_torch_fused_compiled": 1.3}  # issue 20's goals
TIME_LINE = re.compile(r"^Time: ([\d.]+) s from launch: (.*?)(?:; beside training: (.*))?$", re.M)


def run(cmd: list[str], env=None, check=True) -> tuple[str, float]:
    """Run a command from the repository root; returns (stdout, wall seconds)."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and check:
        sys.exit(
            f"error: command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout + (
        "" if proc.returncode == 0 else f"\nEXIT {proc.returncode}\n{proc.stderr[-3000:]}"
    ), wall


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


def time_breakdown(stdout: str) -> dict | None:
    """The parts of the run's closing "Time: ..." line, in seconds."""
    match = TIME_LINE.search(stdout)
    if not match:
        return None
    parts = {"launch_to_done": float(match.group(1))}
    for group, prefix in ((match.group(2), ""), (match.group(3) or "", "beside_training:")):
        for name, seconds in re.findall(r"([a-z][a-z -]*?) ([\d.-]+) s", group):
            parts[prefix + name.strip()] = float(seconds)
    return parts


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
        steps=logs[-1]["step"] if logs else 0, training_s=training_s,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in logs) if logs else None,
        mfu=statistics.median(mfus) if mfus else None,
        final_val_loss=evals[-1]["val_loss"] if evals else None,
        final_train_loss=evals[-1]["train_loss"] if evals else None,
        best_val_loss=min(r["val_loss"] for r in evals) if evals else None,
        best_step=min(evals, key=lambda r: r["val_loss"])["step"] if evals else None,
    )  # fmt: skip


def train_run(
    py: str, train_args: list[str], xla_flags: str | None = None, keep: str | None = None, cold: bool = True
) -> dict:
    """train.py in a subprocess, from cold caches unless cold is False (the smoke mode: the caller's
    caches): its figures. keep: a run directory to train in and leave behind (default: a temporary one)."""
    with tempfile.TemporaryDirectory(prefix="orpheus-gpu-check-") as tmp:
        workdir = keep or os.path.join(tmp, "run")
        env = dict(os.environ)
        if cold:
            env["ORPHEUS_CACHE"] = os.path.join(tmp, "cache")
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
        if xla_flags is not None:
            env["XLA_FLAGS"] = xla_flags
        out, wall = run([py, "train.py", *train_args, "--workdir", workdir], env=env)
        compiled = re.search(r"Compiled the train step in ([0-9.]+) s", out)
        with open(os.path.join(workdir, "config.json")) as f:
            run_config = json.load(f)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return dict(
        summarize_training(records, run_config), process_s=wall, breakdown=time_breakdown(out),
        compile_s=float(compiled.group(1)) if compiled else None, dtype=run_config["dtype"],
    )  # fmt: skip


def compare(figures: dict) -> dict:
    """Ratios against the PyTorch reference, and each of issue 20's goals: met, missed, or not measured."""
    jax_tok_s = figures["train"].get("tokens_per_s")
    torch = figures.get("torch_train", {})
    ratios = {f"x_torch_{name}": jax_tok_s / r["tokens_per_s"] for name, r in torch.items() if jax_tok_s}
    values = {
        "training_s": figures["train"].get("training_s"),
        "process_s": figures["train"].get("process_s"),
        **ratios,
    }
    verdict = {}
    for key, goal in GOALS.items():
        value = values.get(key)
        met = None if value is None else (value < goal if key.endswith("_s") else value >= goal)
        verdict[key] = dict(value=value, goal=goal, met=met)
    return dict(ratios=ratios, goals=verdict)


def steps(args, py: str, data: str, figures: dict, save) -> None:
    """Each measurement in turn, most wanted first (a lease may end early), saving the figures after each."""
    smoke = args.smoke
    base = (
        ["--config", "tiny", "--config.max_iters=10"]
        if smoke
        else ["--config", "iliad_char", "--config.dtype=bfloat16"]
    )
    base += ["--data", data]
    kept_run = os.path.join(tempfile.gettempdir(), f"orpheus-gpu-check-run-{os.getpid()}")
    figures["train"] = train_run(py, base, keep=kept_run, cold=not smoke)
    save()
    torch_reference(args, py, data, figures, save, ["fused_compiled"])
    if args.options:
        figures["options"] = dict(
            args=args.options.split(), **train_run(py, base + args.options.split(), cold=not smoke)
        )
        save()
    exactness(args, py, data, figures)
    save()
    speculative(args, py, kept_run, figures)
    save()
    variants(args, py, base, figures, save)
    out, _ = run([py, "benchmarks/bench_sample.py", *sample_args(smoke)])
    figures["sample"] = [r for r in json_lines(out) if r.get("metric") == "tokens_per_s"]
    save()
    torch_reference(args, py, data, figures, save, ["seed"])


def speculative(args, py: str, workdir: str, figures: dict) -> None:
    """Batch-1 characters/s of --draft none against ngram on the default run's checkpoint (issue 21)."""
    smoke_grid = ["--new", "40", "--chunk", "8", "--reps", "1", "--draft_len", "4"]
    grid = smoke_grid if args.smoke else ["--reps", "3"]
    out, _ = run(
        [py, "benchmarks/bench_speculative.py", "--workdir", workdir, "--weights", "bfloat16", "--batch", "1",
         "--temperature", "0.8", *grid]
    )  # fmt: skip
    figures["speculative"] = json_lines(out)


def variants(args, py: str, base: list[str], figures: dict, save) -> None:
    """Shorter runs of the lookup embedding with and without deterministic kernels, and of Pallas."""
    short = ["--config.max_iters=" + ("6" if args.smoke else str(args.variant_steps))]
    flags = os.environ.get("XLA_FLAGS", "")
    runs = {
        "gather_deterministic": (
            ["--config.token_embedding=gather"],
            f"{flags} --xla_gpu_deterministic_ops=true",
        ),
        "gather": (["--config.token_embedding=gather"], None),
        "pallas": (["--config.attention=pallas"], None),
    }
    figures.setdefault("variants", {})
    for name, (extra, xla_flags) in runs.items():
        if args.smoke and name != "gather_deterministic":
            continue  # one run checks the path (Pallas's interpreter on a CPU: minutes, tested elsewhere)
        figures["variants"][name] = train_run(
            py, base + short + extra, xla_flags.strip() if xla_flags else None, cold=not args.smoke
        )
        save()


def exactness(args, py: str, data: str, figures: dict) -> None:
    """The resume test without the deterministic flag, and the Pallas kernel's GPU test, on the device."""
    if args.smoke:
        return
    env = dict(os.environ, ORPHEUS_DATA=data, JAX_PLATFORMS="cuda", JAX_DEFAULT_MATMUL_PRECISION="highest")
    tests = [
        "tests/test_train.py::test_resume_is_exact",
        "tests/test_pallas_attention.py::test_compiled_kernels_on_gpu",
        "tests/test_train.py::test_resume_with_averaged_weights_is_exact",
    ]
    out, wall = run(
        [py, "-m", "pytest", "-q", "-p", "no:xdist", "-o", "addopts=", "-p", "no:cacheprovider", *tests],
        env=env,
        check=False,
    )
    figures["exactness"] = dict(summary=(out.strip().splitlines() or [""])[-1], seconds=wall)


def sample_args(smoke: bool) -> list[str]:
    if smoke:
        return ["--new", "4", "--batch", "1", "--reps", "1", "--positions", "10", "--latency_reps", "1",
                "--bw_mib", "4", "--naive_batch", ""]  # fmt: skip
    return ["--new", "500", "--batch", "1", "--reps", "3", "--naive_batch", "", "--weights", "bfloat16"]


def torch_reference(args, py: str, data: str, figures: dict, save, names: list[str]) -> None:
    has_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
    if not os.path.exists(args.torch_reference) or not has_torch:
        figures["torch_skipped"] = "no torch" if not has_torch else f"no {args.torch_reference}"
        return
    common = (["--config", "small", "--device", "cpu", "--steps", "2", "--warmup", "1"] if args.smoke else
              ["--config", "seed", "--device", "cuda", "--amp", "bf16", "--steps", "50",
               "--warmup", "10"])  # fmt: skip
    impls = {
        "seed": ["--impl", "seed"],
        "fused_compiled": ["--impl", "fused"] + ([] if args.smoke else ["--compile"]),
    }
    figures.setdefault("torch_train", {})
    for name in names:
        out, _ = run(
            [py, args.torch_reference, "train", *common, *impls[name]],
            env=dict(os.environ, ORPHEUS_DATA=data),
        )
        figures["torch_train"][name] = json_lines(out)[-1]
        save()


def report(figures: dict, smoke: bool) -> None:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    if smoke:
        print("# SMOKE RUN: tiny sizes on a CPU: no figure or goal below means anything")
    print(f"# device: {figures['machine']}")
    t = figures["train"]
    print(
        f"# train.py, {t['steps']} steps ({t['dtype']}): launch to done {t['process_s']:.1f} s, training "
        f"{t['training_s']:.1f} s, {fmt(t['tokens_per_s'], ',.0f')} tok/s, MFU {fmt(t['mfu'], '.1%')}, "
        "final val "
        f"{fmt(t['final_val_loss'], '.4f')}, best {fmt(t['best_val_loss'], '.4f')} at step {t['best_step']}"
    )
    print(f"# its time breakdown: {t['breakdown']}")
    for name, v in figures.get("variants", {}).items():
        ratio = (
            v["tokens_per_s"] / t["tokens_per_s"] if v.get("tokens_per_s") and t.get("tokens_per_s") else None
        )
        print(
            f"# variant {name}: {fmt(v['tokens_per_s'], ',.0f')} tok/s ({fmt(ratio, '.3f')} of the defaults')"
        )
    if "options" in figures:
        o = figures["options"]
        print(
            f"# options {' '.join(o['args'])}: best val {fmt(o['best_val_loss'], '.4f')} "
            f"at step {o['best_step']}, "
            f"{fmt(o['tokens_per_s'], ',.0f')} tok/s"
        )
    for r in figures.get("speculative", []):
        if r.get("metric") == "tokens_per_s":
            print(f"# speculative {json.dumps(r)}")
    if "exactness" in figures:
        print(f"# exactness tests on the device: {figures['exactness']['summary']}")
    for r in figures.get("sample", []):
        print(
            f"# sampling {r.get('sampler')} {r.get('weights')} batch {r.get('batch')} "
            f"draft {r.get('draft', 'none')}: "
            f"{r['value']:,.0f} tok/s"
        )
    for name, r in figures.get("torch_train", {}).items():
        print(f"# torch reference train {name}: {r['tokens_per_s']:,.0f} tok/s")
    for key, g in figures["goals"].items():
        state = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        print(
            f"# goal {key} {'<' if key.endswith('_s') else '>='} {g['goal']}: "
            f"{fmt(g['value'], '.3g')} ({state})"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU version of every step")
    ap.add_argument(
        "--torch_reference", default=os.path.join(REPO, "..", "shared", "bench", "torch_reference.py")
    )
    ap.add_argument("--variant_steps", type=int, default=1000, help="steps of each variant run")
    ap.add_argument("--options", default="", help="--config.KEY=VALUE ... of the run with issue 22's options")
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
    out, _ = run([py, "-c", "import json, sys; sys.path.insert(0, 'benchmarks'); import _common; "
                  "print(json.dumps(_common.machine_info()))"])  # fmt: skip
    figures["machine"] = json_lines(out)[-1]
    steps(args, py, data, figures, save)
    figures.update(compare(figures))
    report(figures, args.smoke)
    print(json.dumps(figures))
    save()


if __name__ == "__main__":
    main()
