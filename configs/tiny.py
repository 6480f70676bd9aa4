"""orpheus_jax/configs/tiny.py (`--config tiny`), re-exported at this path for
`--config configs/tiny.py` and `from configs import tiny`."""

from orpheus_jax.configs.tiny import get_config

__all__ = ["get_config"]
