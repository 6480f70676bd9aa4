"""orpheus_jax/configs/orpheus_seed.py (`--config orpheus_seed`), re-exported at this path for
`--config configs/orpheus_seed.py` and `from configs import orpheus_seed`."""

from orpheus_jax.configs.orpheus_seed import get_config

__all__ = ["get_config"]
