"""Serve the web demo (needs Gradio: pip install -r requirements-app.txt, or the extra orpheus-jax[app]):
the seed's Space, on your machine. orpheus-app, or python app.py in a checkout.

    orpheus-app --workdir runs/iliad_char_cpu               # http://127.0.0.1:7860
    orpheus-app --workdir runs/iliad_char_cpu --port 8000 --host 0.0.0.0

Type a prompt, choose how many characters; the text streams in as it is generated. The workdir is
any run directory (train.py's or import_seed.py's); without --workdir, $ORPHEUS_WORKDIR, else ./run
(the layout of a Hugging Face Space, see the README).
"""

import os

from orpheus_jax import OrpheusError
from orpheus_jax.cli import add_step_argument, argument_parser, describe_step, run_main


def parse_args(argv):
    p = argument_parser(__doc__)
    p.add_argument("--workdir", default=os.environ.get("ORPHEUS_WORKDIR", "run"), help="a run directory")
    add_step_argument(p)
    p.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT, else 7860")
    p.add_argument(
        "--host",
        nargs="?",
        const="0.0.0.0",
        default=None,
        help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1, this machine "
        "only); --host alone: 0.0.0.0, every interface",
    )
    return p.parse_args(argv)


def run_command(argv: list[str]) -> None:
    """The command on its arguments; errors for the user are OrpheusError."""
    args = parse_args(argv)
    from orpheus_jax import app  # sets GRADIO_ANALYTICS_ENABLED=False before gradio is imported

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OrpheusError("the demo needs Gradio: pip install -r requirements-app.txt") from None
    import jax

    from orpheus_jax.checkpoint import load_run
    from orpheus_jax.sharding import make_mesh, replicated
    from orpheus_jax.user_cache import enable_compilation_cache

    enable_compilation_cache()
    from orpheus_jax.cli.sample import DRAFT_LEN, run_draft_index
    from orpheus_jax.sampler import drafting_pays

    run = load_run(args.workdir, args.step, sharding=replicated(make_mesh(jax.devices()[:1])))
    # Speculative decoding where sample.py's default would use it (the demo streams one sample at a time).
    draft_len = DRAFT_LEN if drafting_pays(run.model_cfg.n_layer, run.model_cfg.n_embd, 1) else 0
    index = run_draft_index(args.workdir, run.tokenizer.vocab_size) if draft_len else None
    streamer = app.TextStreamer(run, draft_len=draft_len, draft_index=index)
    where = describe_step(args.workdir, run.step, args.step)
    print(f"OrpheusGPT: {where}, {run.tokenizer.vocab_size} characters, compiled", flush=True)
    app.launch(app.build_demo(streamer), args.host, args.port)


def main(argv: list[str] | None = None) -> None:
    """orpheus-app and app.py: run_command(argv) (default: sys.argv[1:]) under run_main."""
    run_main(run_command, argv)


if __name__ == "__main__":
    main()
