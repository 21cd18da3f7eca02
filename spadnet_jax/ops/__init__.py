"""Pure-JAX functions behind SPADNet's layers (no parameters, no Flax)."""
from spadnet_jax.ops.conv import (CONV_IMPLS, bias_add, conv3x3, register_conv_formulation,
                                  winograd_pays)
from spadnet_jax.ops.gsac import gate_map, official_gate_index
from spadnet_jax.ops.ordering import after
from spadnet_jax.ops.pac_formulations import (PAC_IMPLS, pac_conv, pac_conv_auto,
                                      pac_conv_einsum, pac_conv_fused, pac_conv_shifted,
                                      register_formulation)
from spadnet_jax.ops.pac_kernels import (KERNELS, PacKernel, gaussian_kernel, inverse_kernel,
                                         register_kernel, squared_distances)
from spadnet_jax.ops.reduce import channel_sum, feature_sum
from spadnet_jax.ops.resample import (bicubic_upsample, pixel_shuffle, pixel_unshuffle, resize,
                                      resize_matrix)
from spadnet_jax.ops.windows import unfold

__all__ = [
    "CONV_IMPLS", "KERNELS", "PAC_IMPLS", "PacKernel", "after", "bias_add", "bicubic_upsample", "channel_sum",
    "conv3x3", "feature_sum", "gate_map", "gaussian_kernel", "inverse_kernel", "official_gate_index", "pac_conv", "pac_conv_auto", "pac_conv_einsum",
    "pac_conv_fused", "pac_conv_shifted", "pixel_shuffle", "pixel_unshuffle", "register_conv_formulation", "register_formulation",
    "register_kernel", "resize", "resize_matrix", "squared_distances", "unfold", "winograd_pays",
]
