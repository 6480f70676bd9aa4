#!/usr/bin/env python3
"""`python app.py ARGS` (in a checkout) is `orpheus-app ARGS` (pip install .): see --help, and
orpheus_jax/cli/app.py."""

from orpheus_jax.cli.app import main

if __name__ == "__main__":
    main()
