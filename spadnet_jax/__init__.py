"""spadnet-jax: SPADNet face super-resolution in JAX/Flax."""
__version__ = "0.1.0"
