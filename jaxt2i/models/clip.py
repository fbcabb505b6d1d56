"""A contrastive image-text model: CLIP (Radford et al. 2021, Sec. 2.3-2.5) at shapes-v1 size.

Two towers map an image and a caption to unit vectors in one joint space, where the cosine
similarity of a matching pair is high; DALL-E ranks its samples with such a model (Ramesh et
al. 2021, Sec. 2.5) and CLIPScore (Hessel et al. 2021) measures text-image agreement with it.

  image -> ImageEncoder (conv tower) -> features -> linear projection -> L2 normalise
  caption -> TextEncoder (jaxt2i/models/text_encoder.py), mean-pooled over the caption's
             tokens -> linear projection -> L2 normalise
  logits = exp(t) * image_embeddings @ text_embeddings^T, the learned temperature t starting
           at log(1 / 0.07) and exp(t) capped at 100 (CLIP, Sec. 2.5)

The image tower is a small conv net, not a ViT. shapes-v1 images are a few flat-colour shapes
on a plain background, and its data sets are small: a conv stack's locality and translation
equivariance learn colour and outline from few examples, where a ViT has to learn them from
data (Dosovitskiy et al. 2021, Sec. 4.2: ViTs overtake ResNets only with large data sets).
Captions also say where things are ("in the top right", "to the left of"), so the last
feature map is flattened rather than pooled: the head sees which position each feature came
from, as the shapes-v1 evaluator's does (jaxt2i/models/shapes_evaluator.py). The text tower
pools by the mean over the caption's tokens (what TextEncoder gives) instead of CLIP's EOS
token; both summarise the caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers
from jaxt2i.models.text_encoder import TextEncoder

# CLIP's temperature: initialised to 0.07, its inverse capped at 100 so training stays stable.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / ||x|| over the last axis, in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _joint(x: jax.Array) -> jax.Array:
  """Projected features -> unit embeddings, split over the batch only.

  The embedding dimension is small and the norm needs all of it, so it is kept whole. Naming
  the layout also matters for correctness: without it, on a data x fsdp x tensor mesh
  (2 x 2 x 2, fsdp_tp rules; jax 0.10.2, Shardy) the fused step returned image rows swapped
  between batch shards (tests/test_clip.py checks the loss on that mesh).
  """
  return nn.with_logical_constraint(l2_normalize(x), ("batch", None))


class ImageEncoder(nn.Module):
  """Conv stages (each halving the resolution) -> flatten -> dense -> LayerNorm."""
  channels: Sequence[int] = (32, 64, 128)  # per stage; multiples of 8 (GroupNorm groups)
  width: int = 256                         # output feature width
  dtype: Any = jnp.float32                 # compute dtype; params stay float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images float [B, H, W, 3] -> features [B, width]."""
    if any(c <= 0 or c % 8 for c in self.channels):
      raise ValueError(f"image encoder channels {tuple(self.channels)}: each must be a positive "
                       "multiple of 8 (GroupNorm with 8 groups)")
    h = images.astype(self.dtype)
    # A 4x4 stride-2 stem sees every pixel once at a quarter of a full-resolution conv's cost.
    h = nn.gelu(layers.conv(self.channels[0], 4, self.dtype, "stem", strides=2)(h))
    for i, width in enumerate(self.channels):
      if i:
        h = nn.gelu(layers.conv(width, 3, self.dtype, f"down_{i}", strides=2)(h))
      h = layers.conv(width, 3, self.dtype, f"conv_{i}")(h)
      h = nn.gelu(layers.group_norm(8, 1e-5, self.dtype, f"norm_{i}")(h))
      h = nn.with_logical_constraint(h, ("batch", "height", "width", "channels"))
    h = h.reshape(h.shape[0], -1)
    h = nn.gelu(layers.dense(self.width, ("embed", "mlp"), self.dtype, "fc")(h))
    return layers.layer_norm(1e-5, self.dtype, "final_norm")(h)


class CLIP(nn.Module):
  """Image and text towers with projections into a shared, L2-normalised embedding space.

  `__call__` (used by init) returns (image embeddings, text embeddings, logit scale); the
  methods `encode_image`, `encode_text` and `logit_scale` run one part
  (`model.apply(variables, x, method="encode_image")`).
  """
  vocab_size: int
  max_length: int                          # tokens per caption incl. EOS
  embed_dim: int = 128                     # joint embedding width
  image_channels: Sequence[int] = (32, 64, 128)
  image_width: int = 256
  text_width: int = 128
  text_depth: int = 2
  text_heads: int = 4
  text_mlp_ratio: int = 4
  attention_implementation: str = "auto"   # auto | einsum | xla | cudnn (models/attention.py)
  init_logit_scale: float = INIT_LOGIT_SCALE
  max_logit_scale: float = MAX_LOGIT_SCALE
  dtype: Any = jnp.float32                 # compute dtype; params and embeddings are float32

  def setup(self):
    if self.max_logit_scale <= 0:
      raise ValueError(f"max_logit_scale={self.max_logit_scale} must be > 0")
    self.image_encoder = ImageEncoder(tuple(self.image_channels), self.image_width, self.dtype)
    self.text_encoder = TextEncoder(
        vocab_size=self.vocab_size, max_length=self.max_length, width=self.text_width,
        depth=self.text_depth, num_heads=self.text_heads, mlp_ratio=self.text_mlp_ratio,
        attention_implementation=self.attention_implementation, dtype=self.dtype)
    # No biases: a shared offset would only shrink the angles between embeddings (as CLIP).
    self.image_projection = layers.dense(self.embed_dim, ("mlp", "embed"), self.dtype,
                                         "image_projection", use_bias=False)
    self.text_projection = layers.dense(self.embed_dim, ("embed", "mlp"), self.dtype,
                                        "text_projection", use_bias=False)
    # A scalar: no axes to name, replicated under every strategy.
    self.log_scale = self.param(
        "logit_scale",
        nn.with_logical_partitioning(nn.initializers.constant(self.init_logit_scale), ()), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images float [B, H, W, 3] (in the range trained on) -> unit vectors [B, embed_dim]."""
    return _joint(self.image_projection(self.image_encoder(images)))

  def encode_text(self, tokens: jax.Array, tokens_mask: jax.Array) -> jax.Array:
    """tokens, tokens_mask [B, L] -> unit vectors [B, embed_dim]."""
    _, pooled = self.text_encoder(tokens, tokens_mask)
    return _joint(self.text_projection(pooled))

  def logit_scale(self) -> jax.Array:
    """exp(t), capped at max_logit_scale. Past the cap the gradient to t is zero, which
    holds t there as CLIP's in-place clamp of the parameter does."""
    return jnp.minimum(jnp.exp(self.log_scale.astype(jnp.float32)), self.max_logit_scale)

  def __call__(self, images: jax.Array, tokens: jax.Array, tokens_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.encode_image(images), self.encode_text(tokens, tokens_mask), self.logit_scale()


VARIANTS: dict[str, dict[str, Any]] = {
    # shapes-v1 at 64 px: about 3M parameters.
    "shapes": {},
    # CPU-sized, for tests and `tiny` configs.
    "tiny": {"embed_dim": 32, "image_channels": (16, 32), "image_width": 64, "text_width": 32,
             "text_depth": 1, "text_heads": 2},
}


def variant(name: str, vocab_size: int, max_length: int, **overrides: Any) -> CLIP:
  """A CLIP of a standard size ("shapes", "tiny"), with fields overridden by keyword."""
  if name not in VARIANTS:
    raise ValueError(f"unknown CLIP variant {name!r}; choose one of {sorted(VARIANTS)}")
  return CLIP(vocab_size=vocab_size, max_length=max_length, **{**VARIANTS[name], **overrides})
