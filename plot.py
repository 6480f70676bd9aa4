#!/usr/bin/env python3
"""`python plot.py ARGS` (in a checkout) is `orpheus-plot ARGS` (pip install .): see --help, and
orpheus_jax/cli/plot.py."""

from orpheus_jax.cli.plot import main

if __name__ == "__main__":
    main()
