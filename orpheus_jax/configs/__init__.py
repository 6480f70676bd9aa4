"""The shipped run configs: `--config NAME` (orpheus-train, train.py) or orpheus_jax.configs.NAME.

iliad_char      the seed recipe (Orpheus-GPT's model, nanoGPT's optimizer): the default on a GPU/TPU
iliad_char_cpu  the CPU preset (about 10 minutes on 2 cores): the default without an accelerator
orpheus_seed    the seed's exact recipe (what import_seed starts from)
tiny            for tests: a few seconds on a CPU
"""

# Why the configs live in the package: a config is code (get_config() builds the ConfigDict), and an
# installed orpheus-train has no checkout beside it, so the files that its default and `--config NAME`
# load must be installed with it; inside the package they import each other as orpheus_jax.configs.X,
# which works from an installed copy and a checkout alike. The checkout's configs/*.py stay as
# one-line re-exports: ml_collections loads a config file by path (`--config configs/tiny.py`, and a
# file of your own the same way), and the tests, notebook and benchmarks import `configs.NAME`.
# The default stays the choice by device: the seed recipe is the point of the project where there is
# an accelerator to run it, and on a CPU it would take days, so the CPU preset trains instead.

import os

from orpheus_jax import OrpheusError

DIR = os.path.dirname(os.path.abspath(__file__))
SEED = "iliad_char"  # the default where JAX sees a GPU or TPU
CPU = "iliad_char_cpu"  # the default on a CPU


def names() -> list[str]:
    """The shipped configs' names, sorted."""
    return sorted(f[:-3] for f in os.listdir(DIR) if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
    """The file of the shipped config `name`."""
    return os.path.join(DIR, f"{name}.py")


def resolve(value: str) -> str:
    """A --config value as ml_collections takes it (a file's path, `:ARG` after it passed to get_config):
    a shipped config's NAME becomes its file (unless a file of that name is here), and a path stays."""
    head, colon, arg = value.partition(":")
    if head in names() and not os.path.isfile(head):
        return path(head) + colon + arg
    if os.path.exists(head) or os.sep in head or "/" in head or head.endswith(".py"):
        return value
    raise OrpheusError(f"no config {head!r}: give a shipped one ({', '.join(names())}) or a file's path")
