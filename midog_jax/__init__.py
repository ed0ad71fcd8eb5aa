"""midog-jax: the MIDOG++ mitotic figure detection baseline in JAX/Flax."""

__version__ = "0.1.0"
