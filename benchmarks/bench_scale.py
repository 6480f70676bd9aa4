"""FSDP against replicated parameters, and the cost of agreeing to stop, on simulated CPU devices.

    python benchmarks/bench_scale.py --devices 8 --configs seed,small --calls 6 --reps 2

- `param_bytes`, `opt_state_bytes`: bytes of the parameters and of the optimizer state held by one
  device (its addressable shards of the live arrays), `param_sharding` replicated or fsdp.
- `compiled_argument_bytes`, `compiled_temp_bytes`: the compiled train step's memory analysis (per
  device): its inputs (state and data) and its scratch space.
- `collective_bytes` (one per kind: all-reduce, all-gather, reduce-scatter, ...): the sizes of the
  results of the compiled step's collectives, summed per device (the data each moves, before
  the algorithm's own factors).
- `step_s` / `tokens_per_s`: median over timed calls (1 step each), replicated and fsdp alternating
  (`--calls 0`: memory only).
- `stop_poll_us`: what distributed.StopAgreement.poll adds to a train call when the run has several
  processes (forced here in one process; timed configs only): "loop difference" = train.py's loop
  (dispatch a call, read the previous call's loss) with and without a poll per call, alternating,
  difference of the medians per call (noise-bound on a shared machine); "idle poll" = one poll on an
  idle device, waiting for its all-reduce: dispatch, collective and read, an upper bound of what a
  poll can add when the loop already waits for the previous call.
"""

import argparse
import os
import sys


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    ap.add_argument(
        "--configs", default="seed,small", help="comma-separated: seed, small (as bench_train.py)"
    )
    ap.add_argument("--calls", type=int, default=6, help="timed calls per repetition (0: memory only)")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of each variant")
    return ap.parse_args()


ARGS = parse()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"  # before jax starts
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import _common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_train import PRESETS, make_config  # noqa: E402

from orpheus_jax import data, distributed  # noqa: E402
from orpheus_jax.model import GPTConfig  # noqa: E402
from orpheus_jax.optim import hyperparams, make_optimizer  # noqa: E402
from orpheus_jax.sharding import make_mesh  # noqa: E402
from orpheus_jax.train import init_state, make_train_step, state_shardings  # noqa: E402

COLLECTIVE = re.compile(
    r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
SHAPE = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collective_bytes(hlo: str) -> dict:
    """{kind: bytes of the results of the step's collectives of that kind} from the compiled HLO."""
    sizes = {}
    for line in hlo.splitlines():
        found = COLLECTIVE.search(line)
        if not found or "-done" in line:
            continue
        for dtype, dims in SHAPE.findall(found.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            width = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
            sizes[found.group(2)] = sizes.get(found.group(2), 0) + n * width
    return sizes


def device0_bytes(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


class NeverStop:
    signal = None

    def __call__(self):
        return False


def main():
    tokenizer, tokens = _common.load_corpus()
    mesh = make_mesh()
    report = _common.Report("scale", **_common.machine_info())
    for name in _common.parse_list(ARGS.configs, str):
        if name not in PRESETS:
            sys.exit(f"--configs: unknown {name!r}")
        runs = {}
        for param_sharding in ("replicated", "fsdp"):
            cfg, _ = make_config(name, [f"param_sharding={param_sharding}", "steps_per_call=1"])
            model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
            optimizer = make_optimizer(cfg)
            state = jax.jit(
                lambda cfg=cfg, model_cfg=model_cfg, optimizer=optimizer: init_state(
                    cfg, model_cfg, optimizer
                ),
                out_shardings=state_shardings(cfg, model_cfg, optimizer, mesh),
            )()
            train_tokens, _ = data.split(tokens.astype(np.uint8), cfg.val_fraction, cfg.block_size)
            source = data.to_device(train_tokens, mesh)
            step = make_train_step(cfg, model_cfg, mesh).lower(state, source, 1, hyperparams(cfg)).compile()
            labels = {"config": name, "param_sharding": param_sharding}
            report.add("param_bytes", device0_bytes(state.params), "B", labels)
            report.add("opt_state_bytes", device0_bytes(state.opt_state), "B", labels)
            memory = step.memory_analysis()
            if memory is not None:
                report.add("compiled_argument_bytes", memory.argument_size_in_bytes, "B", labels)
                report.add("compiled_temp_bytes", memory.temp_size_in_bytes, "B", labels)
            for kind, size in sorted(collective_bytes(step.as_text()).items()):
                report.add("collective_bytes", size, "B", dict(labels, kind=kind))
            runs[param_sharding] = dict(cfg=cfg, state=state, step=step, source=source, times=[])
            if not ARGS.calls:
                continue
            for _ in range(2):  # warm-up
                runs[param_sharding]["state"], metrics = step(runs[param_sharding]["state"], source)
            metrics["loss"].block_until_ready()
        if not ARGS.calls:
            continue
        for _ in range(ARGS.reps):
            for run in runs.values():
                for _ in range(ARGS.calls):
                    t0 = time.perf_counter()
                    run["state"], metrics = run["step"](run["state"], run["source"])
                    metrics["loss"].block_until_ready()
                    run["times"].append(time.perf_counter() - t0)
        for param_sharding, run in runs.items():
            cfg = run["cfg"]
            labels = {"config": name, "param_sharding": param_sharding}
            report.add("step_s", statistics.median(run["times"]), "s", labels, samples=run["times"])
            report.add(
                "tokens_per_s",
                cfg.batch_size * cfg.block_size / statistics.median(run["times"]),
                "tok/s",
                labels,
            )
        bench_stop_poll(report, name, runs["replicated"])
    report.print()


def bench_stop_poll(report, name, run):
    """train.py's loop (dispatch a call, read the previous call's loss) with and without a poll per call."""
    with mock.patch("jax.process_count", return_value=2):  # a multi-process agreement, in one process
        agreement = distributed.StopAgreement(NeverStop(), mesh=make_mesh())
    idle = []
    for _ in range(20):
        t0 = time.perf_counter()
        agreement.poll()
        agreement._pending.block_until_ready()
        idle.append(time.perf_counter() - t0)
    per_call = {"without": [], "with": []}
    for _ in range(ARGS.reps):
        for variant in per_call:
            pending = None
            t0 = time.perf_counter()
            for _ in range(ARGS.calls):
                run["state"], metrics = run["step"](run["state"], run["source"])
                if variant == "with":
                    agreement.poll()
                if pending is not None:
                    np.asarray(pending["loss"])
                pending = metrics
            np.asarray(pending["loss"])
            per_call[variant].append((time.perf_counter() - t0) / ARGS.calls)
    cost = statistics.median(per_call["with"]) - statistics.median(per_call["without"])
    report.add(
        "stop_poll_us",
        cost * 1e6,
        "us",
        {"config": name, "measured": "loop difference"},
        call_s_without=statistics.median(per_call["without"]),
        call_s_with=statistics.median(per_call["with"]),
    )
    report.add(
        "stop_poll_us",
        statistics.median(idle) * 1e6,
        "us",
        {"config": name, "measured": "idle poll"},
        samples=[s * 1e6 for s in idle],
    )


if __name__ == "__main__":
    main()
