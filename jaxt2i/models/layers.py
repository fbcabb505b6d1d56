"""Building blocks shared by every model, each weight named with its logical axes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def dense(features: int, axes: Sequence[str], dtype: Any = jnp.float32, name: str | None = None,
          use_bias: bool = True) -> nn.Dense:
  """nn.Dense whose kernel is named `axes` (in, out) and bias `axes[-1]`."""
  return nn.Dense(
      features, dtype=dtype, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def conv(features: int, kernel: int, dtype: Any = jnp.float32, name: str | None = None,
         strides: int = 1, padding: str = "SAME") -> nn.Conv:
  """Square-kernel nn.Conv with (conv_h, conv_w, conv_in, conv_out) kernel names."""
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))
