"""The command lines: one module each, with the main() that both the console script (orpheus-train,
orpheus-sample, ... after `pip install .`) and the checkout's script (train.py, sample.py, ...) run.

What they share is here: argparse that fails with a one-line error, the exit path, and how to name a
command to the user."""

import argparse
import os
import sys

from orpheus_jax import OrpheusError


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors raise OrpheusError (argparse would print its usage and exit 2)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(message):
        raise OrpheusError(message)

    p.error = error
    return p


def add_step_argument(p: argparse.ArgumentParser) -> None:
    """--step N, or --step best (the checkpoint with the lowest validation loss); default: the latest."""

    def step(text: str):
        if text == "best":
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a step number or 'best', not {text!r}") from None

    p.add_argument("--step", type=step, default=None, help="checkpoint step, or best (default: the latest)")


def describe_step(workdir: str, step: int, asked) -> str:
    """Which checkpoint a command loaded, said when the user asked for the best one."""
    from orpheus_jax import rundir

    best = rundir.read_best(workdir)
    loss = f" (the best: val loss {best[1]:.4f})" if asked == "best" and best else ""
    return f"{workdir}: step {step}{loss}"


def seconds_since_launch() -> float:
    """How long this process has run, from /proc on Linux (elsewhere 0: start-up then goes uncounted)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run_main(main, argv=None) -> None:
    """Run main(argv) (default: sys.argv[1:]): an OrpheusError is `error: ...` on one line of stderr and
    exit status 1; Ctrl-C is exit status 130."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except OrpheusError as e:
        print(f"error: {e}", file=sys.__stderr__, flush=True)
        # Nothing is pending on this path; skip interpreter teardown, where Orbax/tensorstore threads
        # of a failed restore print tracebacks into a closed event loop.
        os._exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def command(script: str) -> str:
    """How the user runs the command of `script` (e.g. "sample"): `python sample.py` where this process
    was started as a checkout's script, else the console script, `orpheus-sample`."""
    if os.path.basename(sys.argv[0]).endswith(".py"):
        return f"python {script}.py"
    return "orpheus-" + script.replace("_", "-")
