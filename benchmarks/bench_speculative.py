#!/usr/bin/env python3
"""Speculative decoding on a trained run: characters/s with --draft none against --draft ngram, the
drafts kept per pass by temperature, and sample.py end to end against the in-process sampler.

    python benchmarks/bench_speculative.py --workdir runs/iliad_char --weights float32,bfloat16,int8 \\
        --batch 1,16 --draft_len 4,8,12 --temperature 0,0.8,1.0 --reps 3
    python benchmarks/bench_speculative.py --workdir runs/iliad_char --e2e --weights float32,int8 \\
        --reps 5 --torch_python ~/.cache/torch-ref/bin/python

In process (the default): for each weight type and batch, a plain Sampler and one speculative Sampler
per draft length, all compiled first; then the timed generations (prompt --prompt, --new tokens, the
same seed) take turns. tokens/s = batch * new / median wall time of a whole generate (prefill
included). acceptance = drafts kept per pass (a pass yields 1 + that many tokens); same_text = the
share of rows whose text equals the plain sampler's (1.0 wherever the logits agree to the bit).

--e2e: sample.py as a new process per run (kept sampler warm: one untimed run first), --new + 20 and
20 characters with the same settings, in turns; chars/s = new / (median time of the long runs -
median time of the short ones), so start-up cancels. Beside it the in-process generate with the same
settings (gap = in-process / end to end), the time to the first character of a --stream run, and with
--torch_python the seed's sampler (../shared/bench/torch_reference.py generate --config seed).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import _common
import bench_startup
import jax
import numpy as np
from _common import Report, median

from orpheus_jax import rundir
from orpheus_jax.checkpoint import load_run
from orpheus_jax.drafts import build_index, load_index
from orpheus_jax.sampler import Sampler
from orpheus_jax.sharding import make_mesh


def run_index(workdir: str, tokenizer):
    """The run's draft index, or one built from the corpus's training split (a run older than it)."""
    try:
        return load_index(rundir.drafts_path(workdir))
    except FileNotFoundError:
        from orpheus_jax import data

        print(f"{workdir} has no drafts.npz: building the index from {_common.data_path()}", file=sys.stderr)
        with open(_common.data_path(), encoding="utf-8") as f:
            tokens = tokenizer.encode(f.read())
        cfg = load_run_config(workdir)
        return build_index(np.asarray(data.split(tokens, cfg.val_fraction, cfg.block_size)[0]))


def load_run_config(workdir: str):
    from orpheus_jax import config as config_lib

    return config_lib.load(rundir.config_path(workdir))


def in_process(args, report: Report, run, index, prompt_ids) -> None:
    """tokens/s, acceptance and same_text for each weight type, batch, draft length and temperature."""
    mesh = make_mesh(jax.devices()[:1])
    for weights in _common.parse_list(args.weights, str):
        for batch in _common.parse_list(args.batch):
            samplers = {0: Sampler(run.model_cfg, run.params, batch_size=batch, chunk=args.chunk,
                                   weights=weights, prng_impl=run.cfg.prng_impl, mesh=mesh)}  # fmt: skip
            for k in _common.parse_list(args.draft_len):
                samplers[k] = Sampler(
                    run.model_cfg, run.params, batch_size=batch, chunk=args.chunk, weights=weights,
                    prng_impl=run.cfg.prng_impl, draft_len=k, draft_index=index, mesh=mesh,
                )  # fmt: skip
            for sampler in samplers.values():  # compile: prefill, decode, speculate and refill
                list(sampler.generate(prompt_ids, run.model_cfg.block_size + 8, rows=range(batch)))
            for temperature in _common.parse_list(args.temperature, float):
                one_setting(args, report, samplers, prompt_ids, weights, batch, temperature)


def one_setting(args, report, samplers, prompt_ids, weights, batch, temperature) -> None:
    times = {k: [] for k in samplers}
    texts, passes = {}, {k: [0, 0] for k in samplers}
    for _ in range(args.reps):  # in turns, so that a passing load hits every sampler alike
        for k, sampler in samplers.items():
            sampler.stats = {"passes": 0, "tokens": 0}
            t0 = time.perf_counter()
            chunks = list(sampler.generate(prompt_ids, args.new, args.seed, range(batch), temperature))
            times[k].append(time.perf_counter() - t0)
            texts[k] = np.concatenate(chunks, axis=1)
            passes[k][0] += sampler.stats["passes"]
            passes[k][1] += sampler.stats["tokens"]
    plain = median(times[0])
    for k, samples in times.items():
        labels = dict(weights=weights, batch=batch, temperature=temperature, draft_len=k)
        speeds = [batch * args.new / t for t in samples]
        report.add("tokens_per_s", median(speeds), "tok/s", labels, speeds)
        if k:
            report.add("x_draft_none", plain / median(samples), "", labels, note="median time of none / this")
            n_passes, n_tokens = passes[k]
            if n_passes:  # none when every token came from the first chunk's plain steps
                report.add("acceptance", n_tokens / n_passes - 1, "", labels, note="drafts kept per pass")
            same = float(np.mean((texts[k] == texts[0]).all(axis=1)))
            report.add("same_text", same, "", labels, note="share of rows equal to --draft none's")


def sample_cmd(workdir: str, new: int, extra: list[str]) -> list[str]:
    return [sys.executable, "sample.py", "--workdir", os.path.abspath(workdir), "--max_new_tokens", str(new),
            *extra]  # fmt: skip


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=_common.REPO, capture_output=True)
    if done.returncode:
        sys.exit(f"sample.py failed: {' '.join(cmd)}\n{done.stderr.decode()[-2000:]}")
    return time.perf_counter() - t0


def end_to_end(args, report: Report, run, index, prompt_ids) -> None:
    """sample.py's characters/s against generate's in this process, and its first character."""
    for weights in _common.parse_list(args.weights, str):
        for draft in ("none", "ngram"):
            labels = dict(weights=weights, draft=draft, temperature=args.e2e_temperature)
            extra = [
                "--prompt", args.prompt, "--temperature", str(args.e2e_temperature), "--weights", weights,
                "--draft", draft, "--draft_len", str(args.e2e_draft_len), "--seed", str(args.seed),
            ]  # fmt: skip
            e2e = command_line_speed(args, report, labels, extra)
            k = args.e2e_draft_len if draft == "ngram" else 0
            inner = generate_speed(args, run, index, prompt_ids, weights, k)
            report.add(
                "generate_chars_per_s", inner, "char/s", labels, note="the same difference, in process"
            )
            report.add("gap", inner / e2e, "", labels, note="generate / sample.py (1.0: no gap)")
            stream_cmd = sample_cmd(args.workdir, 50, extra + ["--stream"])
            firsts = [
                bench_startup.timed_run(stream_cmd, args.prompt.encode())["first_char_s"]
                for _ in range(args.reps)
            ]
            report.add(
                "first_char_s", median(firsts), "s", labels, firsts, note="launch to the first character"
            )
    if args.torch_python:
        seed_sampler(args, report)


SHORT = 20  # characters of the short end-to-end run, whose time is subtracted


def command_line_speed(args, report: Report, labels: dict, extra: list[str]) -> float:
    long_cmd, short_cmd = (sample_cmd(args.workdir, n, extra) for n in (args.new + SHORT, SHORT))
    wall(long_cmd)  # keeps the sampler (compiles once)
    longs, shorts = [], []
    for _ in range(args.reps):
        longs.append(wall(long_cmd))
        shorts.append(wall(short_cmd))
    e2e = args.new / (median(longs) - median(shorts))
    note = f"{args.new} / (t({args.new + SHORT}) - t({SHORT})), medians"
    report.add("sample_py_chars_per_s", e2e, "char/s", labels, note=note)
    return e2e


def generate_speed(args, run, index, prompt_ids, weights: str, draft_len: int) -> float:
    sampler = Sampler(
        run.model_cfg, run.params, batch_size=1, weights=weights, prng_impl=run.cfg.prng_impl,
        draft_len=draft_len, draft_index=index, mesh=make_mesh(jax.devices()[:1]),
    )  # fmt: skip

    def go(n):
        return list(sampler.generate(prompt_ids, n, args.seed, [0], args.e2e_temperature))

    go(run.model_cfg.block_size + 8)  # compiles
    t_long = median(_common.time_calls(lambda: go(args.new + SHORT), args.reps, warmup=0))
    t_short = median(_common.time_calls(lambda: go(SHORT), args.reps, warmup=0))
    return args.new / (t_long - t_short)


def seed_sampler(args, report: Report) -> None:
    """The seed's sampler (PyTorch, the whole context recomputed per character), batch 1."""
    script = os.path.join(_common.REPO, "..", "shared", "bench", "torch_reference.py")
    if not os.path.exists(script):
        script = os.path.join(_common.REPO, ".shared", "bench", "torch_reference.py")
    cmd = [args.torch_python, script, "generate", "--config", "seed", "--new", str(args.new), "--reps", "3"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, ORPHEUS_DATA=_common.data_path())
    )
    if done.returncode:
        sys.exit(f"torch reference failed:\n{done.stderr[-2000:]}")
    figure = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]
    report.add(
        "seed_sampler_chars_per_s", figure, "char/s", dict(batch=1), note="torch_reference.py generate"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a trained run")
    ap.add_argument("--weights", default="float32", help="weight types, comma-separated")
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated (in process)")
    ap.add_argument("--draft_len", default="4,8,12", help="draft lengths, comma-separated (in process)")
    ap.add_argument("--temperature", default="0,0.8,1.0", help="temperatures, comma-separated (in process)")
    ap.add_argument("--new", type=int, default=500, help="new characters per generation")
    ap.add_argument("--prompt", default="S")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=64, help="tokens per decode call (sample.py's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--e2e", action="store_true", help="sample.py end to end instead of the in-process grid")
    ap.add_argument("--e2e_temperature", type=float, default=0.8)
    ap.add_argument("--e2e_draft_len", type=int, default=8)
    ap.add_argument(
        "--torch_python", default=None, help="with --e2e: a Python with torch, for the seed's sampler"
    )
    args = ap.parse_args()

    run = load_run(args.workdir)
    index = run_index(args.workdir, run.tokenizer)
    prompt_ids = run.tokenizer.encode(args.prompt)
    report = Report("speculative", run=os.path.basename(os.path.abspath(args.workdir)), step=run.step,
                    new=args.new, prompt=args.prompt, **_common.machine_info())  # fmt: skip
    (end_to_end if args.e2e else in_process)(args, report, run, index, prompt_ids)
    report.print()


if __name__ == "__main__":
    main()
