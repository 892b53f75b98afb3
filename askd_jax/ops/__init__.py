"""Backend-specific formulations of a few computations the models and the train step need.

Each function computes what its name says, with the value of XLA's plain op (tests/test_ops.py
checks values and gradients against it); with `cpu=True` it is written so that XLA:CPU runs
it fast, with `cpu=False` it is the plain op. Each docstring gives the measured reason
(docs/benchmarks.md has the profiles). Which one runs is chosen once, when the task builds
the model: `on_cpu(platform)` of the devices it will run on (the train loop's mesh), kept
in the model's `cpu_ops` field and passed down to every layer that calls these.
"""
from askd_jax.ops.conv import conv_general_dilated, fusion_region, kernel_grad, subpixel_input_grad
from askd_jax.ops.platform import on_cpu
from askd_jax.ops.reduce import (channel_sum, channel_sums, global_norm, spatial_max, spatial_sum,
                                 square_sum)

__all__ = ["on_cpu", "channel_sum", "channel_sums", "square_sum", "global_norm", "spatial_sum",
           "spatial_max", "conv_general_dilated", "kernel_grad", "subpixel_input_grad",
           "fusion_region"]
