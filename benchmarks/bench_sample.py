#!/usr/bin/env python3
"""Sampling speed of the seed-sized model (random weights): the cached Sampler against a naive
crop-and-recompute sampler, single-step latency, and batch-1 time per token against the bound set
by reading every weight once per token.

    python benchmarks/bench_sample.py --new 500,2000 --batch 1,16 --reps 3

tokens/s = batch * new / median wall time of a whole generation (prefill included, compile not).
Weight-bandwidth bound per token = float32 param_bytes / read bandwidth, where read bandwidth is the
fastest of: a jitted sum over a large array (bytes read / s), and half of each copy bandwidth (a jitted
copy into a donated buffer, numpy.copyto; counted as (bytes read + written) / s).
"""

import argparse
import functools
import time

import _common
import jax  # after _common, which puts the repository on sys.path
import jax.numpy as jnp
import numpy as np
from _common import Report, median
from jax import lax

from configs import iliad_char
from orpheus_jax.model import GPTConfig, count_params, decoding_weights, forward, init_params
from orpheus_jax.quantize import WEIGHTS
from orpheus_jax.sampler import Sampler


def bandwidth(reps: int, mib: int) -> dict:
    """Samples in bytes/s over a float32 array of `mib` MiB: copies count bytes read + written."""
    n = mib * 2**20 // 4
    src_N, dst_N = jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32)
    # Donating the destination lets XLA write in place; a fresh output buffer runs several times slower.
    copy = jax.jit(lambda dst_N, src_N: dst_N.at[:].set(src_N), donate_argnums=0)
    read = jax.jit(lambda src_N: jnp.sum(src_N))

    def jax_copy():
        nonlocal dst_N
        dst_N = copy(dst_N, src_N)
        dst_N.block_until_ready()

    src_np, dst_np = np.ones(n, np.float32), np.zeros(n, np.float32)
    timed = lambda fn: _common.time_calls(fn, reps, warmup=2)  # noqa: E731
    return dict(
        jax_copy=[8 * n / t for t in timed(jax_copy)],
        numpy_copy=[8 * n / t for t in timed(lambda: np.copyto(dst_np, src_np))],
        jax_read=[4 * n / t for t in timed(lambda: read(src_N).block_until_ready())],
    )


class NaiveSampler:
    """The seed's sampler: a full forward over the last block_size tokens for every new token.

    The window has a fixed size (block_size) so that one compilation serves every step; the
    logits are read at the last filled position, which the causal mask keeps from seeing padding."""

    def __init__(self, model_cfg: GPTConfig, params, batch_size: int):
        self.model_cfg, self.params, self.batch_size = model_cfg, params, batch_size

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)  # self is static: hashed by identity
    def _step(self, params, window_BL, length, key, i):
        L = self.model_cfg.block_size
        logits_BLV = forward(self.model_cfg, params, window_BL)
        logits_BV = lax.dynamic_index_in_dim(logits_BLV, length - 1, axis=1, keepdims=False)
        token_B = jax.random.categorical(jax.random.fold_in(key, i), logits_BV).astype(jnp.int32)
        # Append the token; once the window is full, drop its oldest (the seed's idx[:, -block_size:]).
        full = length == L
        window_BL = jnp.where(full, jnp.roll(window_BL, -1, axis=1), window_BL)
        window_BL = lax.dynamic_update_slice(window_BL, token_B[:, None], (0, jnp.where(full, L - 1, length)))
        return window_BL, jnp.minimum(length + 1, L), token_B

    def generate(self, prompt_id: int, n_new: int, seed: int = 0) -> np.ndarray:
        window_BL = jnp.zeros((self.batch_size, self.model_cfg.block_size), jnp.int32).at[:, 0].set(prompt_id)
        length, key = jnp.int32(1), jax.random.key(seed)
        tokens = []
        for i in range(n_new):  # dispatch is asynchronous: the host syncs only at the end
            window_BL, length, token_B = self._step(self.params, window_BL, length, key, np.int32(i))
            tokens.append(token_B)
        return np.stack(jax.device_get(tokens), axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", default="500,2000", help="new tokens per generation, comma-separated")
    ap.add_argument("--batch", default="1,16", help="batch sizes (rows), comma-separated")
    ap.add_argument("--reps", type=int, default=3, help="timed generations per setting")
    ap.add_argument("--chunk", type=int, default=128, help="Sampler chunk: tokens per decode call")
    ap.add_argument(
        "--weights",
        default="float32",
        help=f"weight types of the cached sampler, comma-separated: {', '.join(WEIGHTS)}",
    )
    ap.add_argument(
        "--shift",
        type=int,
        default=None,
        help="Sampler shift (default: block_size // 2; 1 = the seed's crop)",
    )
    ap.add_argument(
        "--naive_new",
        default="500",
        help="new tokens for the naive sampler (its cost per token is fixed, so longer runs only cost time)",
    )
    ap.add_argument("--naive_batch", default="1", help="batch sizes for the naive sampler ('' to skip it)")
    ap.add_argument("--positions", default="10,250", help="positions at which to time a single decode step")
    ap.add_argument("--bw_mib", type=int, default=128, help="array size for the bandwidth measurements")
    ap.add_argument("--latency_reps", type=int, default=10, help="timed single steps per position")
    args = ap.parse_args()
    new_list, batches = _common.parse_list(args.new), _common.parse_list(args.batch)
    weight_types = _common.parse_list(args.weights, str)
    for w in weight_types:
        if w not in WEIGHTS:
            ap.error(f"unknown weights {w!r}; choose from {', '.join(WEIGHTS)}")
    naive_new, naive_batches = _common.parse_list(args.naive_new), _common.parse_list(args.naive_batch)

    tokenizer, tokens = _common.load_corpus()
    cfg = iliad_char.get_config()
    model_cfg = GPTConfig.from_run_config(cfg, tokenizer.vocab_size)
    params = init_params(model_cfg, jax.random.key(0))
    n_params = count_params(params)
    newline = int(tokenizer.encode("\n")[0])
    report = Report("sample", config="seed", params=n_params, chunk=args.chunk, **_common.machine_info())

    bw_samples = bandwidth(max(args.reps, 5), args.bw_mib)
    bw = {name: median(samples) for name, samples in bw_samples.items()}
    for name, samples in bw_samples.items():
        report.add(
            "bandwidth_gb_per_s",
            bw[name] / 1e9,
            "GB/s",
            dict(kind=name),
            [b / 1e9 for b in samples],
            note=f"{'(read + written)' if 'copy' in name else 'bytes read'} / s, {args.bw_mib} MiB float32",
        )
    # Read bandwidth: the fastest of a direct read (a sum) and half of each copy's (read + written) rate;
    # the fastest, because the bound is a floor on time per token.
    read_bw, read_source = max(
        (bw["jax_read"], "jax_read"),
        (bw["jax_copy"] / 2, "jax_copy / 2"),
        (bw["numpy_copy"] / 2, "numpy_copy / 2"),
    )
    bound_s = {}
    for w in sorted(set(weight_types) | {"float32"}):
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(decoding_weights(params, w)))
        bound_s[w] = nbytes / read_bw
        report.add(
            "weight_bound_ms_per_token",
            bound_s[w] * 1e3,
            "ms",
            dict(weights=w, batch=1),
            param_bytes=nbytes,
            read_gb_per_s=read_bw / 1e9,
            note=f"param bytes / read bandwidth ({read_source})",
        )

    def add_speed(sampler_name, batch, new, times, weights="float32"):
        labels = dict(sampler=sampler_name, weights=weights, batch=batch, new=new)
        report.add(
            "tokens_per_s",
            median([batch * new / t for t in times]),
            "tok/s",
            labels,
            [batch * new / t for t in times],
        )
        ms = median(times) / new * 1e3
        report.add("ms_per_step", ms, "ms", labels, note="wall time / new tokens (one step serves the batch)")
        if batch == 1:
            report.add(
                "x_weight_bound", ms / 1e3 / bound_s[weights], "", labels, note="ms_per_step / weight bound"
            )

    # Every (batch, weights) sampler is built and compiled first; the timed generations then take
    # turns (one repetition of each setting per round), so a load that comes and goes hits all alike.
    samplers = {}
    for batch, w in ((batch, w) for batch in batches for w in weight_types):
        sampler = Sampler(model_cfg, params, batch_size=batch, chunk=args.chunk, shift=args.shift, weights=w)
        samplers[batch, w] = sampler
        list(sampler.generate([newline], model_cfg.block_size + 1))  # compiles prefill and decode
    times = {(batch, w, new): [] for (batch, w) in samplers for new in new_list}
    for _ in range(args.reps):
        for (batch, w), sampler in samplers.items():
            for new in new_list:
                times[batch, w, new] += _common.time_calls(
                    lambda s=sampler, n=new: list(s.generate([newline], n)), 1, warmup=0
                )
    for (batch, w, new), samples in times.items():
        add_speed("cached", batch, new, samples, w)

    for (batch, w), sampler in samplers.items():
        # One decode step with `pos` tokens already in the buffer; decode returns host numpy, so it syncs.
        for pos in _common.parse_list(args.positions):
            prompt = tokens[:pos]
            step_times = []
            for _ in range(args.latency_reps + 1):  # the first is a warm-up
                state, _ = jax.block_until_ready(
                    sampler.start(prompt)
                )  # decode donates the state: prefill anew
                t0 = time.perf_counter()
                sampler.decode(state, 1)
                step_times.append(time.perf_counter() - t0)
            labels = dict(sampler="cached", weights=w, batch=batch, position=pos)
            report.add(
                "step_latency_ms",
                median(step_times[1:]) * 1e3,
                "ms",
                labels,
                [t * 1e3 for t in step_times[1:]],
            )
            if batch == 1:
                report.add(
                    "x_weight_bound",
                    median(step_times[1:]) / bound_s[w],
                    "",
                    labels,
                    note="step latency / weight bound",
                )

    for batch in naive_batches:
        naive = NaiveSampler(model_cfg, params, batch)
        naive.generate(newline, 2)  # compile
        for new in naive_new:
            add_speed(
                "naive",
                batch,
                new,
                _common.time_calls(lambda s=naive, n=new: s.generate(newline, n), args.reps, warmup=0),
            )
    report.print()


if __name__ == "__main__":
    main()
