"""jax_ifmvse: IF-MVSE speech emotional attribute prediction in JAX/Flax."""

__version__ = "0.1.0"
