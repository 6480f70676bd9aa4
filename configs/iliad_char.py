"""orpheus_jax/configs/iliad_char.py (`--config iliad_char`), re-exported at this path for
`--config configs/iliad_char.py` and `from configs import iliad_char`."""

from orpheus_jax.configs.iliad_char import get_config

__all__ = ["get_config"]
