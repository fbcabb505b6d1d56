"""A transformer text encoder over sentencepiece tokens, trained with the image model.

Latent diffusion conditions its U-Net on per-token states through cross-attention (Rombach et
al. 2022, Sec. 3.3, where tau_theta is such a transformer trained jointly on LAION captions);
the pooled vector serves models that want one embedding per caption. Pre-LN blocks
(LayerNorm -> self-attention -> residual, LayerNorm -> GELU MLP -> residual), learned position
embeddings, padding masked out of every attention.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers
from jaxt2i.models.attention import Attention


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return layers.layer_norm(1e-6, dtype, name)


class TextEncoderBlock(nn.Module):
  width: int
  num_heads: int
  mlp_dim: int
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    attn = Attention(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                     use_bias=True, implementation=self.attention_implementation,
                     dtype=self.dtype, name="attn")
    x = x + attn(_layer_norm(self.dtype, "norm1")(x), mask=mask)
    h = _layer_norm(self.dtype, "norm2")(x)
    h = nn.gelu(layers.dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(h))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return x + layers.dense(self.width, ("mlp", "embed"), self.dtype, "fc2")(h)


class TextEncoder(nn.Module):
  vocab_size: int
  max_length: int
  width: int = 256
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, tokens_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """tokens, tokens_mask [B, L] -> (per-token states [B, L, width], pooled [B, width]).

    Padding positions get states too (they attend to the real tokens only); consumers should
    mask them, as the U-Net's cross-attention does with `tokens_mask`. An all-padding caption
    (the unconditional prompt) still gives finite states: its tokens attend to themselves.
    """
    if self.width % self.num_heads:
      raise ValueError(f"text encoder width {self.width} is not divisible by num_heads "
                       f"{self.num_heads}")
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"{tokens.shape[1]} tokens, but the text encoder was built for at most "
                       f"{self.max_length}")
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("length", "embed")), (self.max_length, self.width))
    valid = tokens_mask.astype(bool)
    x = embed(tokens) + pos[:tokens.shape[1]].astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    # Keys: the caption's tokens; a row with none lets each position see itself.
    eye = jnp.eye(tokens.shape[1], dtype=bool)
    mask = (valid[:, None, None, :]
            | (~valid.any(-1))[:, None, None, None] & eye[None, None])
    for i in range(self.depth):
      x = TextEncoderBlock(self.width, self.num_heads, self.mlp_ratio * self.width,
                           self.attention_implementation, self.dtype, name=f"block_{i}")(x, mask)
    states = _layer_norm(self.dtype, "final_norm")(x)
    weights = valid.astype(jnp.float32)[..., None]
    pooled = (states.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return states, pooled.astype(states.dtype)
