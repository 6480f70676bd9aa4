"""Export a trained run to ONNX (needs onnx: pip install -r requirements-export.txt, or the extra
orpheus-jax[export]). orpheus-export, or python export.py in a checkout.

    orpheus-export --workdir runs/iliad_char_cpu --onnx orpheus.onnx            # the seed's forward pass
    orpheus-export --workdir runs/iliad_char_cpu --onnx orpheus.onnx --decode   # + .prefill.onnx, .step.onnx

orpheus.onnx is the seed's export: input `input` int64 [batch_size, sequence_length], output `output`
float32 logits [batch_size, sequence_length, vocab], sequence_length <= block_size. --decode adds the
cached decode (a prefill graph and a one-token step graph with key/value buffers as inputs and
outputs); examples/onnx_generate.py samples with them in ONNX Runtime alone.
"""

import os

from orpheus_jax import OrpheusError
from orpheus_jax.cli import add_step_argument, argument_parser, describe_step, run_main


def parse_args(argv):
    p = argument_parser(__doc__)
    p.add_argument("--workdir", required=True, help="a run directory (train.py or import_seed.py)")
    add_step_argument(p)
    p.add_argument("--onnx", required=True, help="the forward graph's file, e.g. orpheus.onnx")
    p.add_argument(
        "--decode", action="store_true", help="also write <name>.prefill.onnx and <name>.step.onnx"
    )
    return p.parse_args(argv)


def run_command(argv: list[str]) -> None:
    """The command on its arguments; errors for the user are OrpheusError."""
    args = parse_args(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise OrpheusError(
            "the export needs the onnx package: pip install -r requirements-export.txt"
        ) from None
    from orpheus_jax.checkpoint import load_run
    from orpheus_jax.export import export_run

    run = load_run(args.workdir, args.step)
    for path in export_run(run, args.onnx, args.decode):
        print(
            f"Wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) "
            f"from {describe_step(args.workdir, run.step, args.step)}"
        )


def main(argv: list[str] | None = None) -> None:
    """orpheus-export and export.py: run_command(argv) (default: sys.argv[1:]) under run_main."""
    run_main(run_command, argv)


if __name__ == "__main__":
    main()
