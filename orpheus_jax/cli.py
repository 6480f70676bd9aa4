"""What the command lines share: argparse that fails with a one-line error, and the exit path."""

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


def run_main(main) -> None:
    """Run main(argv): an OrpheusError is `error: ...` on one line of stderr and exit status 1."""
    try:
        main(sys.argv[1:])
    except OrpheusError as e:
        print(f"error: {e}", file=sys.__stderr__, flush=True)
        # Nothing is pending on this path; skip interpreter teardown, where Orbax/tensorstore threads
        # of a failed restore print tracebacks into a closed event loop.
        os._exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
