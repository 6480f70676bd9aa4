#!/usr/bin/env python3
"""What a speculative pass costs against a decode step, by model size: where `--draft ngram` can pay.

    python benchmarks/bench_draft_cost.py [--shapes 4x128,4x192,4x256,6x256,6x384] [--weights float32,int8]

Random weights (the cost of a step or a pass does not depend on them), batch 1, temperature 0.8, the
Iliad's training split as the draft index. For each shape LAYERSxWIDTH (heads = layers, as the seed's
6 x 6 x 384 and the CPU preset's 4 x 4 x 128; block 256 from width 384 up, else 128): step_ms = the
plain sampler's time per token; pass_ms = the speculative sampler's time per pass (its first chunk's
plain steps subtracted); then the speed-up drafting would give at 1.2 and 1.3 drafts kept a pass (what
trained runs keep at temperature 0.8: bench_speculative.py), (1 + kept) x step / pass. Medians of
--reps generations of --new tokens after a compile, the two samplers taking turns.
"""

import argparse
import time

import _common
import jax
import numpy as np
from _common import Report, median

from orpheus_jax.cli.sample import DRAFT_LEN
from orpheus_jax.configs import iliad_char_cpu
from orpheus_jax.drafts import build_index
from orpheus_jax.model import GPTConfig, init_params
from orpheus_jax.sampler import Sampler, blocks_matmul_params
from orpheus_jax.sharding import make_mesh


def samplers(shape: str, weights: str, vocab_size: int, index, mesh):
    layers, width = (int(x) for x in shape.split("x"))
    cfg = iliad_char_cpu.get_config()
    cfg.update(n_layer=layers, n_head=layers, n_embd=width, block_size=256 if width >= 384 else 128)
    model_cfg = GPTConfig.from_run_config(cfg, vocab_size)
    params = init_params(model_cfg, jax.random.key(0))
    common = dict(batch_size=1, weights=weights, mesh=mesh)
    plain = Sampler(model_cfg, params, **common)
    drafted = Sampler(model_cfg, params, draft_len=DRAFT_LEN, draft_index=index, **common)
    return model_cfg, plain, drafted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4x128,4x192,4x256,6x256,6x384", help="LAYERSxWIDTH, comma-separated")
    ap.add_argument("--weights", default="float32,int8", help="weight types, comma-separated")
    ap.add_argument("--new", type=int, default=600, help="tokens per generation")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tokenizer, tokens = _common.load_corpus()
    index = build_index(np.asarray(tokens[: int(len(tokens) * 0.9)]))
    mesh = make_mesh(jax.devices()[:1])
    prompt = tokenizer.encode("S")
    report = Report("draft_cost", new=args.new, **_common.machine_info())
    for weights in _common.parse_list(args.weights, str):
        for shape in _common.parse_list(args.shapes, str):
            model_cfg, plain, drafted = samplers(shape, weights, tokenizer.vocab_size, index, mesh)
            for sampler in (plain, drafted):  # compile
                list(sampler.generate(prompt, model_cfg.block_size + 8))
            steps, passes = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                list(plain.generate(prompt, args.new, 0, None, 0.8))
                steps.append((time.perf_counter() - t0) / args.new)
                drafted.stats = {"passes": 0, "tokens": 0}
                t0 = time.perf_counter()
                list(drafted.generate(prompt, args.new, 0, None, 0.8))
                plain_steps = args.new - drafted.stats["tokens"]  # the first chunk's, and before refills
                spent = time.perf_counter() - t0 - plain_steps * steps[-1]
                passes.append(spent / max(drafted.stats["passes"], 1))
            step, one_pass = median(steps), median(passes)
            matmul = blocks_matmul_params(model_cfg.n_layer, model_cfg.n_embd)
            labels = dict(weights=weights, shape=shape, matmul_params=f"{matmul / 1e6:.1f}M")
            report.add("step_ms", 1e3 * step, "ms", labels, [1e3 * s for s in steps])
            report.add("pass_ms", 1e3 * one_pass, "ms", labels, [1e3 * p for p in passes])
            for kept in (1.2, 1.3):
                report.add(f"x_at_{kept}_kept", (1 + kept) * step / one_pass, "", labels)
    report.print()


if __name__ == "__main__":
    main()
