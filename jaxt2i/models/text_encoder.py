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


# ---------------------------------------------------------------------------------------------
# CLIP's text transformer (Radford et al. 2021), the text encoder of Stable Diffusion.

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD 1.x)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),    # OpenCLIP (SD 2.x)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPTextBlock(nn.Module):
  width: int
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  epsilon: float = 1e-5
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    attn = Attention(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                     use_bias=True, implementation=self.attention_implementation,
                     dtype=self.dtype, name="self_attn")
    x = x + attn(layers.layer_norm(self.epsilon, self.dtype, "layer_norm1")(x), mask=mask)
    h = layers.layer_norm(self.epsilon, self.dtype, "layer_norm2")(x)
    h = ACTIVATIONS[self.activation](layers.dense(self.mlp_dim, ("embed", "mlp"), self.dtype,
                                                  "fc1")(h))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return x + layers.dense(self.width, ("mlp", "embed"), self.dtype, "fc2")(h)


class CLIPTextTransformer(nn.Module):
  """CLIP's text tower as `transformers.CLIPTextModel` computes it: token + learned position
  embeddings, pre-LN blocks under a causal mask (and the padding mask when given), a final
  LayerNorm, and the pooled state at the end-of-text token. Field names follow
  `CLIPTextConfig`; `jaxt2i.convert.transformers_clip` loads its weights."""
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # The end-of-text id that pools; 2 is transformers' legacy value, meaning "the highest id in
  # the row" (CLIP's EOT, 49407, is the largest id in its vocabulary).
  eos_token_id: int = 2
  # > 0: `CLIPTextModelWithProjection` (SDXL's second text encoder): the pooled state also
  # goes through text_projection (no bias) to "text_embeds" [B, projection_dim]. 0: the plain
  # CLIPTextModel (SD 1.x / 2.x), no projection weights.
  projection_dim: int = 0
  attention_implementation: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               output_hidden_states: bool = False) -> dict[str, Any]:
    """input_ids [B, L] (L <= max_position_embeddings) -> {"last_hidden_state" [B, L, D]
    (final-normed), "pooled" [B, D] (at the EOT token), and with output_hidden_states
    "hidden_states": the embeddings and each block's output (not normed), L + 1 arrays as
    transformers returns them: SD's "clip skip" takes final_layer_norm of hidden_states[-2],
    see `penultimate`; with projection_dim, "text_embeds" [B, projection_dim]}."""
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported; choose one of "
                       f"{sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    batch, length = input_ids.shape
    if length > self.max_position_embeddings:
      raise ValueError(f"{length} tokens, but this CLIP text encoder takes at most "
                       f"{self.max_position_embeddings}")
    init = nn.initializers.normal(0.02)
    token_embedding = nn.Embed(
        self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding",
        embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))
    positions = self.param("position_embedding", nn.with_logical_partitioning(
        init, ("length", "embed")), (self.max_position_embeddings, self.hidden_size))
    x = token_embedding(input_ids) + positions[:length].astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      # Padded keys are hidden from every query, as in transformers (the first token, CLIP's
      # start-of-text, is never padding, so no row is empty).
      mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    hidden_states = [x]
    for i in range(self.num_hidden_layers):
      x = CLIPTextBlock(self.hidden_size, self.num_attention_heads, self.intermediate_size,
                        self.hidden_act, self.layer_norm_eps, self.attention_implementation,
                        self.dtype, name=f"layers_{i}")(x, mask)
      hidden_states.append(x)
    final_norm = layers.layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")
    states = final_norm(x)
    if self.eos_token_id == 2:
      eot = jnp.argmax(input_ids, axis=-1)
    else:
      eot = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    out = {"last_hidden_state": states, "pooled": states[jnp.arange(batch), eot]}
    if self.projection_dim:
      out["text_embeds"] = layers.dense(self.projection_dim, ("embed", "mlp"), self.dtype,
                                        "text_projection", use_bias=False)(out["pooled"])
    if output_hidden_states:
      out["hidden_states"] = tuple(hidden_states)
      out["penultimate"] = final_norm(hidden_states[-2])
    return out
