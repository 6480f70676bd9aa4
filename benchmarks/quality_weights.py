#!/usr/bin/env python3
"""What the decoding weight types cost in quality, on a trained run: the validation loss with each
type's weights, and how far greedy decoding agrees with float32's.

    python benchmarks/quality_weights.py --workdir runs/iliad_char_cpu --weights float32,bfloat16,int8

- `val_loss`: mean cross-entropy over the run's whole validation split, cut into consecutive windows
  of block_size + 1 characters (every character predicted once, from the window's earlier ones).
- `greedy_agreement`: for each of `--prompts` prompts (val text at evenly spaced places, 64
  characters each), `--new` characters decoded greedily (temperature 0) with each type and with
  float32; the share of positions where they agree, and where they first differ (a difference
  changes the context, so the texts usually part there).
"""

import argparse

import _common
import jax  # after _common, which puts the repository on sys.path
import numpy as np
import optax
from _common import Report

from orpheus_jax import data
from orpheus_jax.checkpoint import load_run
from orpheus_jax.model import decoding_weights, forward
from orpheus_jax.quantize import WEIGHTS
from orpheus_jax.sampler import Sampler


def val_loss(model_cfg, params, val_tokens, batch_size: int = 32) -> float:
    T = model_cfg.block_size
    n = (len(val_tokens) - 1) // T
    inputs = np.asarray(val_tokens[: n * T]).reshape(n, T)
    targets = np.asarray(val_tokens[1 : n * T + 1]).reshape(n, T)
    loss = jax.jit(
        lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(forward(model_cfg, p, x), y).sum()
    )
    total = 0.0
    for i in range(0, n, batch_size):
        total += float(loss(params, inputs[i : i + batch_size], targets[i : i + batch_size]))
    return total / (n * T)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a trained run")
    ap.add_argument("--weights", default=",".join(WEIGHTS), help="comma-separated weight types")
    ap.add_argument("--new", type=int, default=500, help="greedy characters per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    args = ap.parse_args()
    run = load_run(args.workdir)
    model_cfg = run.model_cfg
    text = data.read_text(_common.data_path())
    _, val_tokens = data.split(run.tokenizer.encode(text), run.cfg.val_fraction, model_cfg.block_size)
    report = Report("quality", workdir=args.workdir, step=run.step, **_common.machine_info())

    starts = np.linspace(0, len(val_tokens) - 64, args.prompts).astype(int)
    prompts = [val_tokens[s : s + 64] for s in starts]

    def greedy(weights):
        sampler = Sampler(model_cfg, run.params, batch_size=1, weights=weights, prng_impl=run.cfg.prng_impl)
        return [
            np.concatenate(list(sampler.generate(p, args.new, temperature=0.0)), axis=1)[0] for p in prompts
        ]

    reference = greedy("float32")
    for w in args.weights.split(","):
        labels = dict(weights=w)
        report.add(
            "val_loss",
            val_loss(model_cfg, decoding_weights(run.params, w), val_tokens),
            "nats",
            labels,
            note="whole val split, windows of block_size",
        )
        texts = reference if w == "float32" else greedy(w)
        agree = [float((t == r).mean()) for t, r in zip(texts, reference)]
        first = [int(np.argmin(t == r)) if (t != r).any() else len(t) for t, r in zip(texts, reference)]
        report.add(
            "greedy_agreement",
            float(np.mean(agree)),
            "",
            labels,
            agree,
            note=f"share of {args.new} greedy characters equal to float32's, mean over prompts",
        )
        report.add(
            "greedy_first_difference",
            float(np.median(first)),
            "chars",
            labels,
            [float(f) for f in first],
            note="position of the first character that differs from float32's, median over prompts",
        )
    report.print()


if __name__ == "__main__":
    main()
