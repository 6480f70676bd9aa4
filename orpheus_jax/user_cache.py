"""Per-user cache: the downloaded corpus and JAX's persistent compilation cache (unless the user points
JAX's cache elsewhere)."""

import os

import jax


def user_cache_dir() -> str:
    """$ORPHEUS_CACHE, else $XDG_CACHE_HOME/orpheus_jax, else ~/.cache/orpheus_jax."""
    if os.environ.get("ORPHEUS_CACHE"):
        return os.environ["ORPHEUS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "orpheus_jax")


def compilation_cache_dir() -> str:
    """JAX's own $JAX_COMPILATION_CACHE_DIR where the user set it, else xla/ in the user cache."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(user_cache_dir(), "xla")


def enable_compilation_cache() -> None:
    """Keep compiled programs across runs, so a second run of the same config starts fast."""
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    # The defaults skip programs that compile in under a second: most of ours on an accelerator.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
