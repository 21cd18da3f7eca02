"""Face SR data: tfds builders (registered on import), LR synthesis and the grain pipeline."""
from spadnet_jax.data import builders, degrade, landmarks
from spadnet_jax.data.builders import BadExample, FaceFolder, SyntheticFaces

__all__ = ["BadExample", "FaceFolder", "SyntheticFaces", "builders", "degrade", "landmarks"]
