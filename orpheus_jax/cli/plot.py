"""Plot the train and val losses of one or more runs in one figure (a PNG): orpheus-plot, or python
plot.py in a checkout.

    orpheus-plot runs/iliad_char_cpu --out losses.png
    orpheus-plot runs/iliad_char runs/iliad_char_bf16 runs/iliad_char_cpu --out compare.png

Each run directory needs the metrics.jsonl that train.py writes; a training run also redraws its
own <workdir>/losses.png at every evaluation.
"""

import os

from orpheus_jax import OrpheusError
from orpheus_jax.cli import argument_parser, run_main
from orpheus_jax.metrics import plot_losses, read_jsonl
from orpheus_jax.rundir import metrics_path


def run_command(argv: list[str]) -> None:
    """The command on its arguments; errors for the user are OrpheusError."""
    p = argument_parser(__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by train.py")
    p.add_argument("--out", default="losses.png", help="the PNG to write (default: losses.png)")
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


def main(argv: list[str] | None = None) -> None:
    """orpheus-plot and plot.py: run_command(argv) (default: sys.argv[1:]) under run_main."""
    run_main(run_command, argv)


if __name__ == "__main__":
    main()
