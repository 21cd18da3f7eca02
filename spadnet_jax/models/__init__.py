"""Flax modules of SPADNet, and the model <-> configuration mapping."""
from spadnet_jax.models.config import from_config, to_config
from spadnet_jax.models.layers import HAB, RCAB, ChannelAttention, HabOptions, PacConv, Upsample2x
from spadnet_jax.models.spadnet import NUM_HEATMAPS, SCALES, SPADNet, count_params

__all__ = ["HAB", "RCAB", "ChannelAttention", "HabOptions", "NUM_HEATMAPS", "PacConv", "SCALES",
           "SPADNet", "Upsample2x", "count_params", "from_config", "to_config"]
