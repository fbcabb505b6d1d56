"""The conditional U-Net of latent diffusion (Rombach et al., 2022, Sec. 3.3 and App. E.2.2).

An encoder-decoder of time-conditioned residual blocks (layers.ResnetBlock) with skip
connections, where the blocks at the chosen resolutions add a spatial transformer: GroupNorm,
a projection to tokens, transformer blocks (self-attention, cross-attention to the text
encoder's states, GEGLU feed-forward) and a projection back, added to the input.

The module is the Stable Diffusion 1.x / 2.x / XL member of diffusers'
`UNet2DConditionModel`, written out for that family only (SDXL adds the "text_time"
embedding of the pooled text and of the image size / crop, Podell et al., 2023, Sec. 2.2):
its fields keep diffusers' names and meanings (including the `attention_head_dim` quirk
below), its submodules keep diffusers' names with list indices as suffixes
(`down_blocks.0.resnets.1.conv1` -> down_blocks_0/resnets_1/conv1), so that
jaxt2i/convert/diffusers_unet.py maps a diffusers checkpoint one to one, and it
computes the same function (checked to 1e-4 in tests/test_unet.py, SDXL's in
tests/test_sdxl.py). Arrays are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers
from jaxt2i.models.attention import Attention

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """What every block of one U-Net shares (hashable, so a Linen field)."""
  groups: int                    # GroupNorm groups
  eps: float                     # GroupNorm epsilon of the residual blocks and the output norm
  dropout: float                 # in the residual blocks only, as in diffusers
  use_linear_projection: bool    # transformer proj_in / proj_out: Dense (SD2) or 1x1 conv (SD1)
  attention_implementation: str  # see jaxt2i.models.attention
  dtype: Any                     # compute dtype
  remat_policy: str = ""         # "" or a layers.REMAT_POLICIES key, for every resnet and
                                 # transformer block


class GEGLU(nn.Module):
  """Gated GELU (Shazeer, 2020): a * gelu(b) for a, b = split(x W). The halves stay one
  kernel (`proj`), as in diffusers, so under tensor parallelism the split crosses the `mlp`
  shards and XLA inserts the exchange."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(2 * self.features, ("embed", "mlp"), self.dtype, "proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward, `mult` x wide: net_0 (GEGLU) then net_2 (diffusers' names)."""
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(x.shape[-1] * self.mult, self.dtype, name="net_0")(x)
    return layers.dense(x.shape[-1], ("mlp", "embed"), self.dtype, "net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention, cross-attention to `context`, GEGLU.

  No dropout: diffusers' U-Net blocks do not pass theirs to the transformers.
  """
  num_heads: int
  head_dim: int
  settings: BlockSettings

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    s = self.settings

    def attention(name):
      return Attention(self.num_heads, self.head_dim, implementation=s.attention_implementation,
                       dtype=s.dtype, name=name)
    x = x + attention("attn1")(layers.layer_norm(1e-5, s.dtype, "norm1")(x))
    x = x + attention("attn2")(layers.layer_norm(1e-5, s.dtype, "norm2")(x), context)
    x = x + FeedForward(dtype=s.dtype, name="ff")(layers.layer_norm(1e-5, s.dtype, "norm3")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Transformer2D(nn.Module):
  """Spatial transformer (diffusers' Transformer2DModel on continuous input): GroupNorm,
  proj_in, `num_layers` BasicTransformerBlocks over the H*W tokens, proj_out, + input.

  Projection names: as 1x1 convs the usual conv axes; as Dense (SD2) proj_in is
  (conv_in, embed) and proj_out (embed, conv_out), channels on the conv side.
  """
  num_heads: int
  num_layers: int
  settings: BlockSettings

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    s = self.settings
    batch, height, width, channels = x.shape
    if channels % self.num_heads:
      raise ValueError(f"{channels} channels do not split into {self.num_heads} attention heads")
    h = layers.group_norm(s.groups, 1e-6, s.dtype, "norm")(x)
    if s.use_linear_projection:
      h = layers.dense(channels, ("conv_in", "embed"), s.dtype, "proj_in")(
          h.reshape(batch, height * width, channels))
    else:
      h = layers.conv(channels, 1, s.dtype, "proj_in", padding=0)(h)
      h = h.reshape(batch, height * width, channels)
    for i in range(self.num_layers):
      block = layers.remat(BasicTransformerBlock, s.remat_policy)
      h = block(self.num_heads, channels // self.num_heads, s,
                name=f"transformer_blocks_{i}")(h, context)
    if s.use_linear_projection:
      h = layers.dense(channels, ("embed", "conv_out"), s.dtype, "proj_out")(h)
      h = h.reshape(batch, height, width, channels)
    else:
      h = h.reshape(batch, height, width, channels)
      h = layers.conv(channels, 1, s.dtype, "proj_out", padding=0)(h)
    return h + x


def _resnet(out_channels: int, s: BlockSettings, name: str) -> layers.ResnetBlock:
  block = layers.remat(layers.ResnetBlock, s.remat_policy, static_argnums=(3,))  # determin.
  return block(out_channels, groups=s.groups, eps=s.eps, dropout=s.dropout, dtype=s.dtype,
               name=name)


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (num_heads > 0) or DownBlock2D (num_heads == 0): `num_layers`
  x (resnet [+ transformer]), then an optional stride-2 downsample. Returns the output and
  every intermediate state, which the decoder takes as skip connections."""
  out_channels: int
  num_layers: int
  num_heads: int           # 0: no attention
  transformer_layers: int  # transformer blocks per spatial transformer
  add_downsample: bool
  settings: BlockSettings

  @nn.compact
  def __call__(self, x, temb, context, deterministic):
    skips = []
    for i in range(self.num_layers):
      x = _resnet(self.out_channels, self.settings, f"resnets_{i}")(x, temb, deterministic)
      if self.num_heads:
        x = Transformer2D(self.num_heads, self.transformer_layers, self.settings,
                          name=f"attentions_{i}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample(self.out_channels, self.settings.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the lowest resolution."""
  num_heads: int
  transformer_layers: int
  settings: BlockSettings

  @nn.compact
  def __call__(self, x, temb, context, deterministic):
    channels = x.shape[-1]
    x = _resnet(channels, self.settings, "resnets_0")(x, temb, deterministic)
    x = Transformer2D(self.num_heads, self.transformer_layers, self.settings,
                      name="attentions_0")(x, context)
    return _resnet(channels, self.settings, "resnets_1")(x, temb, deterministic)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D (num_heads > 0) or UpBlock2D: per layer, concatenate the last
  remaining skip on channels, resnet [+ transformer]; then an optional nearest-2x upsample
  to the next skip's size (so odd sizes match diffusers' `upsample_size`)."""
  out_channels: int
  num_heads: int
  transformer_layers: int
  settings: BlockSettings

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size, deterministic):
    for i, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = _resnet(self.out_channels, self.settings, f"resnets_{i}")(x, temb, deterministic)
      if self.num_heads:
        x = Transformer2D(self.num_heads, self.transformer_layers, self.settings,
                          name=f"attentions_{i}")(x, context)
    if upsample_size is not None:
      x = layers.Upsample(self.out_channels, self.settings.dtype, name="upsamplers_0")(
          x, upsample_size)
    return x


def _per_block(value: int | Sequence[int], n: int, field: str) -> tuple[int, ...]:
  """An int for every block, or one value per block (checked)."""
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n or not all(isinstance(v, int) for v in value):
    raise ValueError(f"UNet.{field}={value!r} must be an int or {n} ints (one per block)")
  return value


class UNet(nn.Module):
  """Text-conditioned U-Net: (noisy latents, timesteps, text states) -> prediction.

  Fields follow diffusers' UNet2DConditionModel (SD 1.x / 2.x / XL subset); `variant()` gives
  the standard sizes.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)  # width per resolution
  layers_per_block: int | Sequence[int] = 2  # resnets per down block; up blocks get one more
  # "CrossAttnDownBlock2D" | "DownBlock2D" per resolution, and the mirror image going up.
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  # diffusers' naming quirk: with num_attention_heads=None, `attention_head_dim` is the number
  # of HEADS per block (SD1: 8 everywhere; SD2: (5, 10, 20, 20), i.e. 64-wide heads); the head
  # size is then channels // heads. num_attention_heads, when set, takes precedence.
  attention_head_dim: int | Sequence[int] = 8
  num_attention_heads: int | Sequence[int] | None = None
  cross_attention_dim: int = 768             # width of encoder_hidden_states
  use_linear_projection: bool = False        # SD2: Dense proj_in/out; SD1: 1x1 convs
  transformer_layers_per_block: int | Sequence[int] = 1
  # diffusers computes attention in float32 only with this flag; jaxt2i always does (see
  # attention.py), so it changes nothing here and is kept for config round trips.
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True               # timestep embedding [cos, sin] (SD) or [sin, cos]
  freq_shift: int = 0                        # timestep embedding downscale_freq_shift
  dropout: float = 0.0                       # in the residual blocks (diffusers' placement)
  attention_implementation: str = "auto"     # "auto" | "einsum" | "xla" | "cudnn"
  # Gradient checkpointing of every resnet and transformer block: "" (off), "full", "dots"
  # or "dots_no_batch" (layers.REMAT_POLICIES); the same numbers, less activation memory.
  remat_policy: str = ""
  # SDXL's added conditioning: None (SD 1.x / 2.x) or "text_time": each number of `time_ids`
  # embedded sinusoidally (addition_time_embed_dim wide, flip_sin_to_cos / freq_shift as for
  # the timestep), flattened, concatenated after `text_embeds` (the pooled text embedding),
  # through add_embedding (linear_1, SiLU, linear_2) and added to the timestep embedding.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  # add_embedding's input width: text_embeds' width + len(time_ids) * addition_time_embed_dim
  # (SDXL base: 1280 + 6 * 256 = 2816).
  projection_class_embeddings_input_dim: int | None = None
  # Not in diffusers: append each latent pixel's (x, y), from -1 to 1, to the input channels
  # of conv_in (CoordConv). Convolutions see absolute position only through the zero padding
  # at the borders, which the interior learns slowly; captions that name places need it.
  # The coordinates' conv_in weights set to zero give the model without them.
  position_channels: bool = False
  dtype: Any = jnp.float32                   # compute dtype; params stay float32

  def _conv_in(self, sample: jax.Array) -> jax.Array:
    """conv_in of the latents (and, with position_channels, their coordinates)."""
    x = sample.astype(self.dtype)
    if self.position_channels:
      batch, height, width, _ = x.shape
      ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width),
                            indexing="ij")
      coords = jnp.broadcast_to(jnp.stack([xs, ys], axis=-1).astype(x.dtype),
                                (batch, height, width, 2))
      x = jnp.concatenate([x, coords], axis=-1)
    return layers.conv(self.block_out_channels[0], 3, self.dtype, "conv_in", padding=1)(x)

  def _check(self, sample, encoder_hidden_states) -> None:
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNet needs one down and one up block type per block_out_channels "
                       f"entry ({n}); got {self.down_block_types} and {self.up_block_types}")
    for field, kinds, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                  ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
      if any(kind not in allowed for kind in kinds):
        raise ValueError(f"UNet.{field}={tuple(kinds)}: each must be one of {allowed}")
    if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
      raise ValueError(f"sample must be [B, H, W, {self.in_channels}], got {sample.shape}")
    if (encoder_hidden_states.ndim != 3
        or encoder_hidden_states.shape[-1] != self.cross_attention_dim):
      raise ValueError(f"encoder_hidden_states must be [B, L, {self.cross_attention_dim}], got "
                       f"{encoder_hidden_states.shape}")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"UNet.addition_embed_type={self.addition_embed_type!r}: None or "
                       "'text_time' (SDXL)")
    if self.addition_embed_type and not (self.addition_time_embed_dim
                                         and self.projection_class_embeddings_input_dim):
      raise ValueError("UNet.addition_embed_type='text_time' needs addition_time_embed_dim and "
                       "projection_class_embeddings_input_dim")

  def _blocks(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], BlockSettings]:
    """Heads, resnets and transformer layers per block, and the blocks' shared settings."""
    n = len(self.block_out_channels)
    heads = _per_block(self.num_attention_heads if self.num_attention_heads is not None
                       else self.attention_head_dim, n, "attention_head_dim")
    num_layers = _per_block(self.layers_per_block, n, "layers_per_block")
    t_layers = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    return heads, num_layers, t_layers, BlockSettings(
        self.norm_num_groups, self.norm_eps, self.dropout, self.use_linear_projection,
        self.attention_implementation, self.dtype, self.remat_policy)

  def _embed(self, timesteps: jax.Array, encoder_hidden_states: jax.Array, batch: int,
             text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """(the timestep embedding [B, 4 C0], plus SDXL's added embedding; the text states in the
    compute dtype); called from __call__ (it defines the time_embedding and add_embedding
    submodules)."""
    width = self.block_out_channels[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    temb = layers.timestep_embedding(timesteps, width, self.flip_sin_to_cos,
                                     self.freq_shift).astype(self.dtype)
    temb = layers.TimestepEmbedding(4 * width, self.dtype, name="time_embedding")(temb)
    if self.addition_embed_type == "text_time":
      if text_embeds is None or time_ids is None:
        raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds "
                         "[B, D] and time_ids [B, n]")
      time_ids = jnp.broadcast_to(jnp.asarray(time_ids), (batch, jnp.shape(time_ids)[-1]))
      text_embeds = jnp.broadcast_to(jnp.asarray(text_embeds),
                                     (batch, jnp.shape(text_embeds)[-1]))
      # Sizes and crops are embedded like timesteps, one sinusoid per number.
      time_embeds = layers.timestep_embedding(
          time_ids.reshape(-1), self.addition_time_embed_dim, self.flip_sin_to_cos,
          self.freq_shift).reshape(batch, -1)
      added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
      if added.shape[-1] != self.projection_class_embeddings_input_dim:
        raise ValueError(f"text_embeds ({text_embeds.shape[-1]} wide) and {time_ids.shape[-1]} "
                         f"time ids x {self.addition_time_embed_dim} make {added.shape[-1]} "
                         "features; projection_class_embeddings_input_dim is "
                         f"{self.projection_class_embeddings_input_dim}")
      temb = temb + layers.TimestepEmbedding(4 * width, self.dtype, name="add_embedding")(
          added.astype(self.dtype))
    elif text_embeds is not None or time_ids is not None:
      raise ValueError("text_embeds / time_ids given to a UNet without addition_embed_type")
    return temb, encoder_hidden_states.astype(self.dtype)

  def _encode(self, x: jax.Array, temb: jax.Array, context: jax.Array, deterministic: bool
              ) -> tuple[jax.Array, list[jax.Array]]:
    """The down blocks from conv_in's output x: (their output, every skip state, x first)."""
    n = len(self.block_out_channels)
    heads, num_layers, t_layers, s = self._blocks()
    skips = [x]
    for i, kind in enumerate(self.down_block_types):
      x, block_skips = DownBlock(
          self.block_out_channels[i], num_layers[i],
          heads[i] if kind == "CrossAttnDownBlock2D" else 0, t_layers[i],
          add_downsample=i < n - 1, settings=s, name=f"down_blocks_{i}")(
              x, temb, context, deterministic)
      skips += block_skips
      x = nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))
    return x, skips

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               deterministic: bool = True,
               down_block_additional_residuals: Sequence[jax.Array] | None = None,
               mid_block_additional_residual: jax.Array | None = None,
               text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None) -> jax.Array:
    """Predicts noise (or v / x0, per training) for the latents.

    Args:
      sample: noisy latents [B, H, W, in_channels].
      timesteps: [B] (or a scalar for all), integer or fractional.
      encoder_hidden_states: text states [B, L, cross_attention_dim].
      deterministic: False applies dropout (needs a 'dropout' rng).
      down_block_additional_residuals, mid_block_additional_residual: ControlNet outputs
        (models/controlnet.py), added to every skip connection and to the mid block's output.
      text_embeds, time_ids: SDXL's added conditioning (addition_embed_type="text_time"):
        the pooled text embedding [B, D] and the size / crop numbers [B, n] (diffusers'
        added_cond_kwargs).

    Returns:
      float32 [B, H, W, out_channels].
    """
    self._check(sample, encoder_hidden_states)
    n = len(self.block_out_channels)
    channels = tuple(self.block_out_channels)
    heads, num_layers, t_layers, s = self._blocks()
    temb, context = self._embed(timesteps, encoder_hidden_states, sample.shape[0], text_embeds,
                                time_ids)
    x = self._conv_in(sample)
    x, skips = self._encode(x, temb, context, deterministic)

    if down_block_additional_residuals is not None:
      if len(down_block_additional_residuals) != len(skips):
        raise ValueError(f"{len(down_block_additional_residuals)} down-block residuals for "
                         f"{len(skips)} skip connections")
      skips = [h + r.astype(h.dtype) for h, r in zip(skips, down_block_additional_residuals)]
    x = MidBlock(heads[-1], t_layers[-1], s, name="mid_block")(x, temb, context, deterministic)
    if mid_block_additional_residual is not None:
      x = x + mid_block_additional_residual.astype(x.dtype)

    for i, kind in enumerate(self.up_block_types):
      j = n - 1 - i  # the matching down block
      count = num_layers[j] + 1
      block_skips, skips = skips[-count:], skips[:-count]
      x = UpBlock(channels[j], heads[j] if kind == "CrossAttnUpBlock2D" else 0, t_layers[j], s,
                  name=f"up_blocks_{i}")(
                      x, block_skips, temb, context,
                      skips[-1].shape[1:3] if i < n - 1 else None, deterministic)
      x = nn.with_logical_constraint(x, ("batch", "height", "width", "channels"))

    x = nn.silu(layers.group_norm(self.norm_num_groups, self.norm_eps, self.dtype,
                                  "conv_norm_out")(x))
    x = layers.conv(self.out_channels, 3, self.dtype, "conv_out", padding=1)(x)
    return x.astype(jnp.float32)


VARIANTS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x (CompVis/stable-diffusion-v1-*): 860M parameters, CLIP ViT-L text.
    "sd1": {},
    # Stable Diffusion 2.x (stabilityai/stable-diffusion-2*): 64-wide heads, OpenCLIP ViT-H text.
    "sd2": {"attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
            "use_linear_projection": True},
    # Stable Diffusion XL base (stabilityai/stable-diffusion-xl-base-1.0): 2.6B parameters,
    # CLIP ViT-L + OpenCLIP ViT-bigG text (2048-wide states, 1280-wide pooled embedding).
    "sdxl": {"block_out_channels": (320, 640, 1280),
             "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
             "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
             "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
             "use_linear_projection": True, "transformer_layers_per_block": (1, 2, 10),
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
    # CPU-sized, for tests and `runlocal` configs.
    "tiny": {"block_out_channels": (32, 64), "layers_per_block": 1,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 4,
             "cross_attention_dim": 32, "norm_num_groups": 8},
}


def variant(name: str, **overrides: Any) -> UNet:
  """A UNet of a standard size ("sd1", "sd2", "sdxl", "tiny"), with fields overridden by keyword."""
  if name not in VARIANTS:
    raise ValueError(f"unknown UNet variant {name!r}; choose one of {sorted(VARIANTS)}")
  return UNet(**{**VARIANTS[name], **overrides})
