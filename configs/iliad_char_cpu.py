"""orpheus_jax/configs/iliad_char_cpu.py (`--config iliad_char_cpu`), re-exported at this path for
`--config configs/iliad_char_cpu.py` and `from configs import iliad_char_cpu`."""

from orpheus_jax.configs.iliad_char_cpu import get_config

__all__ = ["get_config"]
