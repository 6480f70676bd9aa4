"""Orpheus-JAX: a character-level GPT on Homer's Iliad, in JAX/Flax."""


class OrpheusError(Exception):
    """A user-facing error: the command lines print its message on one line and exit non-zero."""


class WriteError(OrpheusError):
    """A file of the run directory could not be written (full disk, permissions, read-only)."""
