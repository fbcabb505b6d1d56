"""The latent-diffusion autoencoders: KL-regularised and VQ (Rombach et al. 2022, Sec. 3.1).

The layout is Stable Diffusion's `AutoencoderKL` (and taming's VQ-GAN), module for module, so
SD weights convert one to one:

    encoder: conv_in -> per level: ResnetBlocks (+ stride-2 downsample but at the last level)
             -> mid block (ResnetBlock, single-head self-attention, ResnetBlock)
             -> GroupNorm, SiLU, conv_out -> quant_conv (1x1)
    decoder: post_quant_conv (1x1) -> conv_in -> mid block -> per level, widest first:
             layers_per_block + 1 ResnetBlocks (+ nearest 2x upsample and conv)
             -> GroupNorm, SiLU, conv_out

Downsampling factor f = 2^(levels - 1). KL: the encoder emits a diagonal Gaussian (mean and
log-variance per latent channel); VQ: the encoder output is snapped to a codebook
(models/quantizer.py). Images are NHWC in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers
from jaxt2i.models.attention import Attention
from jaxt2i.models.quantizer import VectorQuantizer


class SpatialSelfAttention(nn.Module):
  """GroupNorm -> single-head self-attention over all positions -> residual (the VAE's mid
  block attention)."""
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = layers.group_norm(self.groups, self.eps, self.dtype, "group_norm")(x)
    y = Attention(num_heads=1, head_dim=c, use_bias=True, dtype=self.dtype, name="attn")(
        y.reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nn.Module):
  channels: int
  groups: int = 32
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.ResnetBlock(self.channels, self.groups, dtype=self.dtype, name="resnets_0")(x, None)
    if self.attention:
      x = SpatialSelfAttention(self.groups, dtype=self.dtype, name="attentions_0")(x)
    return layers.ResnetBlock(self.channels, self.groups, dtype=self.dtype, name="resnets_1")(
        x, None)


class Encoder(nn.Module):
  out_channels: int
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  groups: int = 32
  mid_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.conv(self.block_out_channels[0], 3, self.dtype, "conv_in", padding=1)(x)
    last = len(self.block_out_channels) - 1
    for i, width in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        h = layers.ResnetBlock(width, self.groups, dtype=self.dtype,
                               name=f"down_blocks_{i}_resnets_{j}")(h, None)
      if i < last:
        # SD pads only the bottom and right before a stride-2 valid conv.
        h = layers.conv(width, 3, self.dtype, f"down_blocks_{i}_downsample", strides=2,
                        padding=((0, 1), (0, 1)))(h)
    h = MidBlock(self.block_out_channels[-1], self.groups, self.mid_attention, self.dtype,
                 name="mid_block")(h)
    h = nn.silu(layers.group_norm(self.groups, 1e-6, self.dtype, "conv_norm_out")(h))
    return layers.conv(self.out_channels, 3, self.dtype, "conv_out", padding=1)(h)


class Decoder(nn.Module):
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  groups: int = 32
  mid_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, return_features: bool = False):
    """z [B, h, w, latent] -> images [B, H, W, out]; with `return_features` also the
    activations entering conv_out (for the adaptive GAN weight)."""
    widths = list(reversed(self.block_out_channels))
    h = layers.conv(widths[0], 3, self.dtype, "conv_in", padding=1)(z)
    h = MidBlock(widths[0], self.groups, self.mid_attention, self.dtype, name="mid_block")(h)
    for i, width in enumerate(widths):
      for j in range(self.layers_per_block + 1):
        h = layers.ResnetBlock(width, self.groups, dtype=self.dtype,
                               name=f"up_blocks_{i}_resnets_{j}")(h, None)
      if i < len(widths) - 1:
        h = layers.Upsample(width, self.dtype, name=f"up_blocks_{i}_upsample")(h)
    features = nn.silu(layers.group_norm(self.groups, 1e-6, self.dtype, "conv_norm_out")(h))
    out = layers.conv(self.out_channels, 3, self.dtype, "conv_out", padding=1)(features)
    return (out, features) if return_features else out


class Autoencoder(nn.Module):
  """KL (`kind="kl"`) or VQ (`kind="vq"`) autoencoder; see the module docstring."""
  kind: str = "kl"
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  groups: int = 32
  mid_attention: bool = True
  in_channels: int = 3
  num_codes: int = 1024        # VQ codebook size
  vq_beta: float = 0.25        # VQ commitment weight
  vq_l2_normalize: bool = False
  vq_ema_decay: float = 0.0    # VQ: > 0 makes the codebook an EMA of its assigned inputs
  dtype: Any = jnp.float32

  def setup(self):
    if self.kind not in ("kl", "vq"):
      raise ValueError(f"autoencoder kind {self.kind!r} is unknown; choose 'kl' or 'vq'")
    moments = 2 * self.latent_channels if self.kind == "kl" else self.latent_channels
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, groups=self.groups,
                  mid_attention=self.mid_attention, dtype=self.dtype)
    self.encoder = Encoder(out_channels=moments, **common)
    self.decoder = Decoder(out_channels=self.in_channels, **common)
    self.quant_conv = layers.conv(moments, 1, self.dtype, "quant_conv", padding=0)
    self.post_quant_conv = layers.conv(self.latent_channels, 1, self.dtype, "post_quant_conv",
                                       padding=0)
    if self.kind == "vq":
      self.quantizer = VectorQuantizer(self.num_codes, self.latent_channels, self.vq_beta,
                                       self.vq_l2_normalize, ema_decay=self.vq_ema_decay)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, images: jax.Array) -> dict[str, jax.Array]:
    """KL: {"mean", "logvar"} of the posterior; VQ: {"latents" (quantized), "loss",
    "indices", "perplexity", "usage"}."""
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    if self.kind == "kl":
      mean, logvar = jnp.split(moments, 2, axis=-1)
      return {"mean": mean, "logvar": jnp.clip(logvar, -30.0, 20.0)}
    latents, aux = self.quantizer(moments)
    return {"latents": latents, **aux}

  def decode(self, latents: jax.Array, return_features: bool = False):
    return self.decoder(self.post_quant_conv(latents), return_features=return_features)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None,
               return_features: bool = False):
    """Reconstruct; KL samples the posterior when `rng` is given (else uses its mean).
    Returns (reconstruction[, decoder features], encode() output + "latents")."""
    posterior = self.encode(images)
    if self.kind == "kl":
      latents = posterior["mean"]
      if rng is not None:
        std = jnp.exp(0.5 * posterior["logvar"])
        latents = latents + std * jax.random.normal(rng, latents.shape)
      posterior = {**posterior, "latents": latents}
    out = self.decode(posterior["latents"], return_features=return_features)
    if return_features:
      return out[0], out[1], posterior
    return out, posterior


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, per example [B]."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1)
