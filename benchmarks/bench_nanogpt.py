#!/usr/bin/env python3
"""nanoGPT's own CPU recipe on the Iliad, side by side: wall time from launch and validation loss.

    python benchmarks/bench_nanogpt.py --nanogpt DIR --torch_python PY [--rounds 3]

nanoGPT's README gives a CPU command for its character model (4 x 4 x 128, block 64, batch 12, 2,000
iterations, no dropout, `--device=cpu --compile=False --eval_iters=20`); this runs that command in a
checkout of karpathy/nanoGPT (DIR; nothing is downloaded) on the Iliad, prepared as its
shakespeare_char data is (characters sorted, uint16 ids, the first 90% for training), and
Orpheus-JAX's train.py with the same recipe (learning rate 1e-3 to 1e-4, warmup 100, beta2 0.99,
eval every 250 iterations over 20 batches). Runs alternate (nanoGPT, ours, nanoGPT, ...) after one
warm-up of each, so both have warm caches (ours: JAX's compilation cache in ORPHEUS_CACHE, which this
script gives a directory of its own); it prints each run's wall time and final val loss, then the
medians and their ratio.
"""

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time

import _common
import numpy as np

NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--dataset=iliad_char", "--device=cpu", "--compile=False",
    "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
    "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
    "--always_save_checkpoint=False",
]  # fmt: skip
OURS_ARGS = [
    "--config", "iliad_char", "--config.n_layer=4", "--config.n_head=4", "--config.n_embd=128",
    "--config.block_size=64", "--config.batch_size=12", "--config.max_iters=2000", "--config.dropout=0.0",
    "--config.eval_iters=20", "--config.eval_interval=250", "--config.learning_rate=1e-3",
    "--config.min_lr=1e-4",
    "--config.warmup_iters=100", "--config.beta2=0.99", "--config.weight_decay=0.1", "--config.grad_clip=1.0",
    "--config.checkpoint_interval=2000", "--config.log_interval=50",
]  # fmt: skip


def prepare_nanogpt_data(nanogpt: str) -> None:
    """data/iliad_char/{train,val}.bin and meta.pkl, as nanoGPT's shakespeare_char/prepare.py makes them."""
    with open(_common.data_path(), encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    directory = os.path.join(nanogpt, "data", "iliad_char")
    os.makedirs(directory, exist_ok=True)
    n = int(0.9 * len(ids))
    ids[:n].tofile(os.path.join(directory, "train.bin"))
    ids[n:].tofile(os.path.join(directory, "val.bin"))
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }
    with open(os.path.join(directory, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)


def timed(cmd, cwd, env, val_pattern) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    vals = [float(v) for v in re.findall(val_pattern, proc.stdout)]
    return dict(wall_s=wall, val_loss=vals[-1] if vals else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--torch_python", required=True, help="a Python with torch and numpy installed")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prepare_nanogpt_data(args.nanogpt)
    with tempfile.TemporaryDirectory(prefix="orpheus-vs-nanogpt-") as tmp:
        env = dict(os.environ, ORPHEUS_CACHE=os.path.join(tmp, "cache"))
        nanogpt = lambda i: timed(
            [args.torch_python, "train.py", *NANOGPT_ARGS, f"--out_dir={tmp}/nanogpt{i}"], args.nanogpt, env,
            r"val loss ([\d.]+)",
        )  # fmt: skip
        ours = lambda i: timed(
            [sys.executable, "train.py", *OURS_ARGS, "--workdir", f"{tmp}/ours{i}"], _common.REPO, env,
            r"val loss ([\d.]+)",
        )  # fmt: skip
        nanogpt(0), ours(0)  # warm-up: caches, page cache
        runs = {"nanogpt": [], "orpheus_jax": []}
        for i in range(1, args.rounds + 1):
            for name, fn in (("nanogpt", nanogpt), ("orpheus_jax", ours)):
                runs[name].append(fn(i))
                print(
                    f"# round {i} {name}: {runs[name][-1]['wall_s']:.1f} s, val {runs[name][-1]['val_loss']}",
                    flush=True,
                )
    medians = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()}
    ratio = medians["orpheus_jax"] / medians["nanogpt"]
    print(
        f"# median wall time: nanoGPT {medians['nanogpt']:.1f} s, Orpheus-JAX {medians['orpheus_jax']:.1f} s "
        f"({ratio:.2f}x nanoGPT's)"
    )
    print(json.dumps(dict(runs=runs, medians=medians, ratio=ratio, machine=_common.machine_info())))


if __name__ == "__main__":
    main()
