"""Where the per-user cache and JAX's compilation cache live, from the environment."""

import os

import jax

from orpheus_jax.user_cache import compilation_cache_dir, enable_compilation_cache, user_cache_dir


def test_the_user_cache_is_orpheus_cache_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORPHEUS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert user_cache_dir() == str(tmp_path / "home" / ".cache" / "orpheus_jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == str(tmp_path / "xdg" / "orpheus_jax")
    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path / "ours"))
    assert user_cache_dir() == str(tmp_path / "ours")


def test_jax_compilation_cache_dir_is_honoured_and_empty_means_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("ORPHEUS_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compilation_cache_dir() == str(tmp_path / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert compilation_cache_dir() == os.path.join(str(tmp_path / "ours"), "xla")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compilation_cache_dir() == os.path.join(str(tmp_path / "ours"), "xla")


def test_enabling_points_jax_at_it_and_keeps_every_program(monkeypatch, tmp_path):
    before = {
        name: getattr(jax.config, name)
        for name in (
            "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes",
        )
    }
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    try:
        enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
