"""Building blocks shared by every model, each weight named with its logical axes.

Besides the `dense` / `conv` factories this holds the pieces of the latent-diffusion U-Net
that other models reuse (the autoencoder, ControlNet): normalisation, the sinusoidal timestep
embedding of DDPM (Ho et al., 2020, App. B, after Vaswani et al., 2017, Sec. 3.5), the
time-conditioned residual block and 2x down / up-sampling. Their arithmetic and submodule
names follow diffusers (`ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `TimestepEmbedding`),
so that diffusers checkpoints convert by name (jaxt2i/convert/diffusers_unet.py) and give
the same outputs. Activations run in `dtype`; params are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# What nn.remat keeps for the backward pass (a model's `remat_policy`): "full" keeps only each
# wrapped block's inputs (recompute everything); "dots" keeps matmul and convolution outputs
# (recompute the cheap elementwise work); "dots_no_batch" keeps the weight matmuls' outputs
# but not attention's batched ones.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat(module: type, policy: str, **kwargs) -> type:
  """`module` under nn.remat with a REMAT_POLICIES policy; "" returns it unchanged."""
  if not policy:
    return module
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r}: choose one of {sorted(REMAT_POLICIES)}")
  return nn.remat(module, policy=REMAT_POLICIES[policy], **kwargs)

Padding = str | int | Sequence[tuple[int, int]]


def dense(features: int, axes: Sequence[str], dtype: Any = jnp.float32, name: str | None = None,
          use_bias: bool = True) -> nn.Dense:
  """nn.Dense whose kernel is named `axes` (in, out) and bias `axes[-1]`."""
  return nn.Dense(
      features, dtype=dtype, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def conv(features: int, kernel: int, dtype: Any = jnp.float32, name: str | None = None,
         strides: int = 1, padding: Padding = "SAME") -> nn.Conv:
  """Square-kernel nn.Conv with (conv_h, conv_w, conv_in, conv_out) kernel names.

  `padding` is nn.Conv's: "SAME" / "VALID", or an int p for torch's symmetric `padding=p`
  (which differs from "SAME" at stride 2: SAME pads (0, 1) on even sizes, torch (1, 1)).
  """
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def _norm_inits() -> dict[str, Any]:
  return {"scale_init": nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
          "bias_init": nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))}


def group_norm(num_groups: int, epsilon: float = 1e-5, dtype: Any = jnp.float32,
               name: str | None = None) -> nn.GroupNorm:
  """GroupNorm over the last (channel) axis and all spatial axes, as torch.nn.GroupNorm.

  Statistics are computed in float32 with the two-pass variance (torch's), since the
  one-pass E[x^2] - E[x]^2 loses digits on the large-mean activations deep in a U-Net.
  """
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                      use_fast_variance=False, name=name, **_norm_inits())


def layer_norm(epsilon: float = 1e-5, dtype: Any = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis with float32 two-pass statistics, as torch.nn.LayerNorm."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name,
                      **_norm_inits())


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0,
                       scale: float = 1.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps [N] -> float32 [N, dim].

  Frequency i of dim // 2 is max_period^(-i / (dim // 2 - downscale_freq_shift)); the output
  is [sin, cos] or, with `flip_sin_to_cos`, [cos, sin], zero-padded to an odd `dim`. This is
  diffusers' `get_timestep_embedding`, operation for operation in float32 (SD uses
  flip_sin_to_cos=True, downscale_freq_shift=0).
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be 1-D [N], got shape {timesteps.shape}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  exponent = exponent / (half - downscale_freq_shift)
  emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = scale * emb
  sin, cos = jnp.sin(emb), jnp.cos(emb)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """The MLP that turns the sinusoidal embedding into the conditioning vector: linear_1 -> SiLU
  -> linear_2 (diffusers' TimestepEmbedding with act_fn="silu")."""
  features: int             # output (and hidden) width, 4x the first U-Net width in SD
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(self.features, ("embed", "mlp"), self.dtype, "linear_1")(x)
    return dense(self.features, ("mlp", "embed"), self.dtype, "linear_2")(nn.silu(x))


class ResnetBlock(nn.Module):
  """Residual block with an additive timestep embedding (diffusers' ResnetBlock2D with
  time_embedding_norm="default", as in the DDPM / SD U-Nets):

    h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))
    h = conv2(dropout(silu(norm2(h))))
    out = (shortcut(x) + h) / output_scale_factor

  where shortcut is a 1x1 conv when the channel count changes and the identity otherwise.
  """
  out_channels: int
  groups: int = 32                 # GroupNorm groups (norm_num_groups)
  eps: float = 1e-6                # GroupNorm epsilon (the U-Net's norm_eps)
  dropout: float = 0.0             # after the second norm
  output_scale_factor: float = 1.0
  dtype: Any = jnp.float32         # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None,
               deterministic: bool = True) -> jax.Array:
    """x [B, H, W, C], temb [B, T] or None -> [B, H, W, out_channels]."""
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv(self.out_channels, 3, self.dtype, "conv1", padding=1)(h)
    if temb is not None:
      t = dense(self.out_channels, ("embed", "conv_out"), self.dtype, "time_emb_proj")(
          nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, 3, self.dtype, "conv2", padding=1)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut", padding=0)(x)
    out = x.astype(h.dtype) + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample(nn.Module):
  """Halves height and width with a stride-2 3x3 conv padded by 1 on every side (torch's
  `padding=1`; the odd sizes round up: n -> (n + 1) // 2)."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv(self.out_channels, 3, self.dtype, "conv", strides=2, padding=1)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to `size` (default 2x), with torch's index rule
  (source = floor(target * in / out)), so odd skip sizes in a U-Net match diffusers."""
  height, width = x.shape[1:3]
  size = (2 * height, 2 * width) if size is None else tuple(size)
  if size == (2 * height, 2 * width):  # repeat is a broadcast, cheaper than a gather
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(size[0]) * (height / size[0])).astype(int), height - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * (width / size[1])).astype(int), width - 1)
  return x[:, rows][:, :, cols]


class Upsample(nn.Module):
  """Nearest-neighbour 2x (or to `size`) followed by a 3x3 conv (diffusers' Upsample2D with
  use_conv=True)."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    x = upsample_nearest(x, size)
    return conv(self.out_channels, 3, self.dtype, "conv", padding=1)(x)
