#!/usr/bin/env python3
"""Plot the train and val losses of one or more runs in one figure (a PNG).

    python plot.py runs/iliad_char_cpu --out losses.png
    python plot.py runs/iliad_char runs/iliad_char_bf16 runs/iliad_char_cpu --out compare.png

Each run directory needs the metrics.jsonl that train.py writes; a training run also redraws its
own <workdir>/losses.png at every evaluation.
"""

import argparse
import os
import sys

from orpheus_jax import OrpheusError
from orpheus_jax.checkpoint import metrics_path
from orpheus_jax.metrics import plot_losses, read_jsonl


def main(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by train.py")
    p.add_argument("--out", default="losses.png", help="the PNG to write (default: losses.png)")

    def error(message):  # argparse prints usage and exits 2; we want the one-line form
        raise OrpheusError(message)

    p.error = error
    args = p.parse_args(argv)

    names = [os.path.basename(os.path.normpath(run)) for run in args.runs]
    runs = {}
    for run, name in zip(args.runs, names):
        path = metrics_path(run)
        if not os.path.exists(path):
            raise OrpheusError(
                f"no metrics in {run} (no {os.path.basename(path)}): is it a run directory of train.py?"
            )
        records = read_jsonl(path)
        if not any("loss" in r or "val_loss" in r for r in records):
            raise OrpheusError(f"{path} holds no losses yet")
        runs[name if names.count(name) == 1 else run] = records  # the path where names repeat
    plot_losses(runs, args.out)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OrpheusError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
