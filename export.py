#!/usr/bin/env python3
"""`python export.py ARGS` (in a checkout) is `orpheus-export ARGS` (pip install .): see --help, and
orpheus_jax/cli/export.py."""

from orpheus_jax.cli.export import main

if __name__ == "__main__":
    main()
