#!/usr/bin/env python3
"""`python sample.py ARGS` (in a checkout) is `orpheus-sample ARGS` (pip install .): see --help, and
orpheus_jax/cli/sample.py."""

from orpheus_jax.cli.sample import main

if __name__ == "__main__":
    main()
