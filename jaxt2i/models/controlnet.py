"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of a U-Net's encoder, fed the noisy latents plus an embedding of a
control image (edges, a mask, a pose, ...), whose outputs reach the frozen U-Net's skip
connections and mid block through zero-initialised 1x1 convolutions ("zero convolutions"), so
training starts from the unchanged U-Net.

    residuals = controlnet.apply({"params": c}, latents, t, text, control, scale)
    eps = unet.apply({"params": u}, latents, t, text,
                     down_block_additional_residuals=residuals[0],
                     mid_block_additional_residual=residuals[1])

Several ControlNets are summed (`sum_residuals`). Fields and parameter names follow diffusers'
ControlNetModel, so its weights convert one to one (jaxt2i.convert.diffusers_controlnet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers
from jaxt2i.models.unet import MidBlock, UNet


def _zero_conv(features: int, kernel: int, dtype: Any, name: str) -> nn.Module:
  padding = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((padding, padding),) * 2, dtype=dtype,
                 name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.zeros_init(), ("conv_h", "conv_w", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ("conv_out",)))


class ConditioningEmbedding(nn.Module):
  """The control image [B, H, W, c] -> [B, H / 8, W / 8, channels]: 3x3 convs with SiLU, a
  stride-2 conv per width step, and a zero-initialised output conv."""
  channels: int
  block_out_channels: Sequence[int] = (16, 32, 96, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths = tuple(self.block_out_channels)
    x = nn.silu(layers.conv(widths[0], 3, self.dtype, "conv_in", padding=1)(x))
    k = 0
    for i in range(len(widths) - 1):
      x = nn.silu(layers.conv(widths[i], 3, self.dtype, f"blocks_{k}", padding=1)(x))
      x = nn.silu(layers.conv(widths[i + 1], 3, self.dtype, f"blocks_{k + 1}", strides=2,
                              padding=1)(x))
      k += 2
    return _zero_conv(self.channels, 3, self.dtype, "conv_out")(x)


class ControlNet(UNet):
  """The U-Net fields (the encoder half is built from them) plus the control image's."""
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               controlnet_cond: jax.Array, conditioning_scale: Any = 1.0,
               deterministic: bool = True) -> tuple[list[jax.Array], jax.Array]:
    """Returns (one residual per U-Net skip connection, the mid-block residual), each times
    `conditioning_scale` (may be traced).

    Args:
      sample, timesteps, encoder_hidden_states: as for UNet.
      controlnet_cond: the control image [B, H, W, conditioning_channels] at the pixel size
        the latents decode to (8x theirs for SD), values in [0, 1] as diffusers feeds them.
    """
    self._check(sample, encoder_hidden_states)
    channels = tuple(self.block_out_channels)
    factor = 2 ** (len(self.conditioning_embedding_out_channels) - 1)
    if (controlnet_cond.ndim != 4 or controlnet_cond.shape[-1] != self.conditioning_channels
        or controlnet_cond.shape[1:3] != tuple(factor * d for d in sample.shape[1:3])):
      raise ValueError(f"controlnet_cond must be [B, {factor * sample.shape[1]}, "
                       f"{factor * sample.shape[2]}, {self.conditioning_channels}] for latents "
                       f"{sample.shape}, got {controlnet_cond.shape}")
    heads, _, t_layers, s = self._blocks()
    temb, context = self._embed(timesteps, encoder_hidden_states, sample.shape[0])
    x = self._conv_in(sample)
    x = x + ConditioningEmbedding(channels[0], tuple(self.conditioning_embedding_out_channels),
                                  self.dtype, name="controlnet_cond_embedding")(
                                      controlnet_cond.astype(self.dtype))
    x, skips = self._encode(x, temb, context, deterministic)
    x = MidBlock(heads[-1], t_layers[-1], s, name="mid_block")(x, temb, context, deterministic)

    scale = jnp.asarray(conditioning_scale, self.dtype)
    down = [scale * _zero_conv(h.shape[-1], 1, self.dtype, f"controlnet_down_blocks_{k}")(h)
            for k, h in enumerate(skips)]
    mid = scale * _zero_conv(x.shape[-1], 1, self.dtype, "controlnet_mid_block")(x)
    return down, mid


def sum_residuals(outputs: Sequence[tuple[list[jax.Array], jax.Array]]
                  ) -> tuple[list[jax.Array], jax.Array]:
  """Several ControlNets' (down, mid) residuals summed, as diffusers' MultiControlNetModel."""
  down = [sum(parts) for parts in zip(*(o[0] for o in outputs))]
  return down, sum(o[1] for o in outputs)


def fields_from_unet(unet: UNet, conditioning_channels: int = 3,
                     downsample_factor: int = 8) -> dict[str, Any]:
  """ControlNet fields for a new ControlNet beside `unet` (diffusers' ControlNetModel
  .from_unet): the U-Net's fields, and a conditioning embedding with one stride-2 step per
  factor of two between the control image and the latents (SD: 8 -> (16, 32, 96, 256))."""
  import dataclasses
  steps = max(int(downsample_factor).bit_length() - 1, 0)
  if 2 ** steps != downsample_factor or steps > 3:
    raise ValueError(f"downsample_factor={downsample_factor} must be 1, 2, 4 or 8")
  widths = (16, 32, 96, 256)[:steps + 1]
  fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNet)
            if f.name not in ("parent", "name", "dtype", "attention_implementation",
                              "remat_policy")}
  return {**fields, "conditioning_channels": conditioning_channels,
          "conditioning_embedding_out_channels": widths}


def params_from_unet(unet_params: Any, controlnet_params: Any) -> Any:
  """`controlnet_params` with every subtree the U-Net also has (conv_in, time embedding,
  encoder blocks, mid block) copied from `unet_params`: the ControlNet paper's trainable copy.
  The conditioning embedding and the zero convolutions keep their own (initial) values."""
  def copy(ours, theirs):
    if not isinstance(ours, dict):
      return theirs if getattr(theirs, "shape", None) == getattr(ours, "shape", ()) else ours
    return {k: copy(v, theirs[k]) if k in theirs else v for k, v in ours.items()}
  return {k: copy(v, unet_params[k]) if k in unet_params else v
          for k, v in controlnet_params.items()}
