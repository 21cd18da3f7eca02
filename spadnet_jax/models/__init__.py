"""Flax modules of SPADNet."""
from spadnet_jax.models.layers import HAB, RCAB, ChannelAttention, PacConv, Upsample2x
from spadnet_jax.models.spadnet import NUM_HEATMAPS, SCALES, SPADNet, count_params

__all__ = ["HAB", "RCAB", "ChannelAttention", "NUM_HEATMAPS", "PacConv", "SCALES", "SPADNet",
           "Upsample2x", "count_params"]
