"""Pure-JAX functions behind SPADNet's layers (no parameters, no Flax)."""
from spadnet_jax.ops.conv import bias_add, conv3x3
from spadnet_jax.ops.gsac import gate_map, official_gate_index
from spadnet_jax.ops.ordering import after
from spadnet_jax.ops.pac import (KERNELS, PAC_IMPLS, gaussian_kernel, inverse_kernel, pac_conv,
                                 pac_conv_auto, pac_conv_einsum, pac_conv_fused, pac_conv_shifted,
                                 squared_distances, unfold)
from spadnet_jax.ops.reduce import channel_sum, feature_sum
from spadnet_jax.ops.resample import (bicubic_upsample, pixel_shuffle, pixel_unshuffle, resize,
                                      resize_matrix)

__all__ = [
    "KERNELS", "PAC_IMPLS", "after", "bias_add", "bicubic_upsample", "channel_sum", "conv3x3",
    "feature_sum", "gate_map", "gaussian_kernel", "inverse_kernel", "official_gate_index",
    "pac_conv", "pac_conv_auto", "pac_conv_einsum", "pac_conv_fused", "pac_conv_shifted",
    "pixel_shuffle", "pixel_unshuffle", "resize", "resize_matrix", "squared_distances", "unfold",
]
