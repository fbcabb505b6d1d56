"""Caption -> image regression: the baseline every generative model of jaxt2i must beat.

It predicts one deterministic image per caption (the conditional mean under an L2 loss), so it
learns colour and place but blurs shape; it exists to exercise the data -> trainer ->
checkpoint path at a size that trains in seconds on a CPU, with weights on every logical axis
that the sharding rules know (vocab, embed, mlp, conv_in, conv_out).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxt2i.models import layers


class CaptionRegressor(nn.Module):
  vocab_size: int
  max_length: int
  image_size: int
  width: int = 64           # token embedding width ('embed')
  mlp_dim: int = 256        # hidden width ('mlp')
  base_resolution: int = 8  # the MLP emits a base_resolution^2 feature map, then conv-upsamples
  channels: int = 32        # feature-map channels of the conv decoder
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    batch = tokens.shape[0]
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")), name="token_embed")
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("length", "embed")), (self.max_length, self.width))
    # Position embeddings keep word order, which carries the relation ("red above blue").
    x = (embed(tokens) + pos.astype(self.dtype)) * mask[..., None].astype(self.dtype)
    x = x.reshape(batch, self.max_length * self.width)
    h = layers.dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "mlp"))
    h = layers.dense(self.width, ("mlp", "embed"), self.dtype, "fc2")(h)
    h = nn.gelu(h)
    side = self.base_resolution
    h = layers.dense(side * side * self.channels, ("embed", "mlp"), self.dtype, "to_map")(h)
    h = h.reshape(batch, side, side, self.channels)
    while side < self.image_size:
      side *= 2
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = nn.gelu(layers.conv(self.channels, 3, self.dtype, f"up_conv_{side}")(h))
    h = layers.conv(3, 3, self.dtype, "to_rgb")(h)
    return h.astype(jnp.float32)
