"""Serving a trained model: the SR function as a serialized JAX program, and predict's cache
of such programs per checkpoint."""
