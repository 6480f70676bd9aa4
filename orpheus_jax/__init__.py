"""Orpheus-JAX: a character-level GPT on Homer's Iliad, in JAX/Flax."""


class OrpheusError(Exception):
    """A user-facing error: the CLIs print its message on one line and exit non-zero."""
