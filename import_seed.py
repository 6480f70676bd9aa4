#!/usr/bin/env python3
"""`python import_seed.py ARGS` (in a checkout) is `orpheus-import-seed ARGS` (pip install .): see --help, and
orpheus_jax/cli/import_seed.py."""

from orpheus_jax.cli.import_seed import main

if __name__ == "__main__":
    main()
