#!/usr/bin/env python3
"""`python train.py ARGS` (in a checkout) is `orpheus-train ARGS` (pip install .): see --help, and
orpheus_jax/cli/train.py."""

from orpheus_jax.cli.train import main

if __name__ == "__main__":
    main()
