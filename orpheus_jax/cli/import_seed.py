"""Turn the seed's trained weights (Orpheus-GPT's model.pth) into an Orpheus-JAX run directory:
orpheus-import-seed, or python import_seed.py in a checkout.

    orpheus-import-seed model.pth --workdir runs/seed [--text input.txt]
    orpheus-sample --workdir runs/seed --prompt "Achilles"

Reads the torch.save file (a whole pickled model or a state_dict) without PyTorch and without
executing its pickle. The model's sizes are inferred from its shapes; the run config is the shipped
orpheus_seed (orpheus_jax/configs/orpheus_seed.py: the seed's recipe, attn_scale "embd") with those
sizes. The vocabulary is the sorted set of characters of --text, which must be the text the model was
trained on (default: the Iliad, as train.py finds it). The checkpoint is step 0 with a fresh optimizer
state: train.py (orpheus-train) with the same config and --workdir fine-tunes it.
"""

from orpheus_jax.cli import argument_parser, command, run_main


def parse_args(argv):
    p = argument_parser(__doc__)
    p.add_argument("model", help="the seed's model.pth (torch.save of the model or of its state_dict)")
    p.add_argument("--workdir", required=True, help="the run directory to create")
    p.add_argument(
        "--text",
        default=None,
        help="the training text, for the vocabulary (default: $ORPHEUS_DATA, else the Iliad)",
    )
    return p.parse_args(argv)


def run_command(argv: list[str]) -> None:
    """The command on its arguments; errors for the user are OrpheusError."""
    args = parse_args(argv)
    from orpheus_jax.configs import orpheus_seed
    from orpheus_jax.seed_import import import_seed

    cfg, tokenizer = import_seed(args.model, args.workdir, args.text, orpheus_seed.get_config())
    print(
        f"Imported {args.model}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, block "
        f"{cfg.block_size}, vocabulary {tokenizer.vocab_size}, into {args.workdir} (checkpoint step 0)"
    )
    print(f"Sample from it: {command('sample')} --workdir {args.workdir} --prompt Achilles")


def main(argv: list[str] | None = None) -> None:
    """orpheus-import-seed and import_seed.py: run_command(argv) (default: sys.argv[1:]) under run_main."""
    run_main(run_command, argv)


if __name__ == "__main__":
    main()
