"""Per-user cache: the downloaded corpus and JAX's persistent compilation cache."""

import os

import jax


def user_cache_dir() -> str:
    """$ORPHEUS_CACHE, else $XDG_CACHE_HOME/orpheus_jax, else ~/.cache/orpheus_jax."""
    if os.environ.get("ORPHEUS_CACHE"):
        return os.environ["ORPHEUS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "orpheus_jax")


def enable_compilation_cache() -> None:
    """Keep compiled programs across runs, so a second run of the same config starts fast."""
    jax.config.update("jax_compilation_cache_dir", os.path.join(user_cache_dir(), "xla"))
    # The defaults skip programs that compile in under a second: most of ours on an accelerator.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
