"""Face SR data: registered sources, the data contract, LR synthesis and the grain pipeline."""
from spadnet_jax.data import builders, contract, degrade, landmarks, sources
from spadnet_jax.data.builders import BadExample, FaceFolder, SyntheticFaces
from spadnet_jax.data.sources import DataSource, get_source, register_source

__all__ = ["BadExample", "DataSource", "FaceFolder", "SyntheticFaces", "builders", "contract",
           "degrade", "get_source", "landmarks", "register_source", "sources"]
