"""Helpers shared by the benchmark scripts: paths, the corpus, timing, config overrides, output.

The machine these run on is shared and noisy, so every figure is a median of several timed
repetitions taken after warm-up; min and max go into the JSON so the spread can be judged.
"""

import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as `python benchmarks/bench_*.py` from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from orpheus_jax.tokenizer import CharTokenizer  # noqa: E402


def data_path() -> str:
    """$ORPHEUS_DATA, else ../shared/data/iliad.txt beside the repository (as the tests do)."""
    return os.environ.get("ORPHEUS_DATA") or os.path.join(REPO, "..", "shared", "data", "iliad.txt")


def load_corpus():
    """(tokenizer, all tokens as int32) of the corpus."""
    with open(data_path(), encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.from_text(text)
    return tokenizer, tokenizer.encode(text)


def time_calls(fn, reps: int, warmup: int = 1) -> list[float]:
    """Wall times of `reps` calls of fn() after `warmup` untimed ones; fn must block until done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_flops(dtype, n: int = 2048, reps: int = 5, compiler_options=None) -> list[float]:
    """FLOP/s samples of a jitted n x n x n matmul with float32 accumulation and output."""
    a_NN = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b_NN = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(
        lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), compiler_options=compiler_options
    )
    return [2 * n**3 / t for t in time_calls(lambda: dot(a_NN, b_NN).block_until_ready(), reps, warmup=2)]


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def apply_overrides(cfg, assignments: list[str]) -> dict:
    """Apply KEY=VALUE strings to a ConfigDict, each cast to the type the key already has."""
    applied = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or key not in cfg:
            raise SystemExit(f"--set wants KEY=VALUE with a key of configs/iliad_char.py, got {assignment!r}")
        kind = type(cfg[key])
        if kind is bool:
            value = raw.lower() in ("1", "true", "yes")
        else:
            value = kind(float(raw)) if kind is int and "." in raw else kind(raw)
        cfg[key] = value
        applied[key] = value
    return applied


def machine_info() -> dict:
    """What a figure was measured on. The processor's model too: "2 CPU cores" has meant an AMD EPYC
    on one day and an Intel Xeon on another, whose figures differ by more than our changes do."""
    return dict(
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        devices=jax.device_count(),
        processor=processor_model(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        python=platform.python_version(),
    )


def processor_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as Linux reports it, else its architecture (x86_64, arm64, ...)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.machine()  # not platform.processor(): on Linux it starts `uname -p`


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


class Report:
    """Collects figures; prints them as a table (lines start with '# ') and then as JSON lines."""

    def __init__(self, bench: str, **common):
        self.bench, self.common, self.rows = bench, common, []

    def add(self, metric: str, value: float, unit: str, labels: dict, samples=None, note: str = "", **extra):
        """One figure; `labels` name it in the table, `extra` (and the spread of `samples`) go to JSON
        only."""
        record = dict(bench=self.bench, **labels, metric=metric, value=value, unit=unit, **extra)
        if samples:
            record.update(n=len(samples), min=min(samples), max=max(samples))
        if note:
            record["note"] = note
        label = " ".join(f"{k}={v}" for k, v in labels.items())
        self.rows.append((label, record))
        print(f"[{self.bench}] {label} {metric} = {fmt(value)} {unit}", file=sys.stderr, flush=True)

    def print(self) -> None:
        print(f"# {self.bench} benchmark: " + ", ".join(f"{k} {v}" for k, v in self.common.items()))
        for label, r in self.rows:
            spread = f"  [{fmt(r['min'])}..{fmt(r['max'])}, n={r['n']}]" if "n" in r else ""
            note = f"  ({r['note']})" if "note" in r else ""
            print(f"# {label:<56} {r['metric']:<24} {fmt(r['value']):>10} {r['unit']}{spread}{note}")
        for _, r in self.rows:
            print(json.dumps(dict(r, **self.common)))


def median(samples) -> float:
    return statistics.median(samples)
