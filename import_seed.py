#!/usr/bin/env python3
"""Turn the seed's trained weights (Orpheus-GPT's model.pth) into an Orpheus-JAX run directory.

    python import_seed.py model.pth --workdir runs/seed [--text input.txt]
    python sample.py --workdir runs/seed --prompt "Achilles"

Reads the torch.save file (a whole pickled model or a state_dict) without PyTorch and without
executing its pickle. The model's sizes are inferred from its shapes; the run config is
configs/orpheus_seed.py (the seed's recipe, attn_scale "embd") with those sizes. The vocabulary is
the sorted set of characters of --text, which must be the text the model was trained on (default:
the Iliad, as train.py finds it). The checkpoint is step 0 with a fresh optimizer state: train.py
with the same config and --workdir fine-tunes it.
"""

from orpheus_jax.cli import argument_parser, run_main


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


def main(argv) -> None:
    args = parse_args(argv)
    from configs import orpheus_seed
    from orpheus_jax.seed_import import import_seed

    cfg, tokenizer = import_seed(args.model, args.workdir, args.text, orpheus_seed.get_config())
    print(
        f"Imported {args.model}: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims, block "
        f"{cfg.block_size}, vocabulary {tokenizer.vocab_size}, into {args.workdir} (checkpoint step 0)"
    )
    print(f"Sample from it: python sample.py --workdir {args.workdir} --prompt Achilles")


if __name__ == "__main__":
    run_main(main)
