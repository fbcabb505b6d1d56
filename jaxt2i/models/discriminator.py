"""PatchGAN discriminator (Isola et al. 2017), as the VQ-GAN / latent-diffusion autoencoders use.

Each output logit judges one overlapping patch (70x70 pixels with the default three layers) as
real or reconstructed, which pushes the decoder towards sharp local texture without asking a
global judgement of a small autoencoder. Normalisation is GroupNorm (batch statistics would
need mutable state and couple the examples of a sharded batch).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers


class PatchDiscriminator(nn.Module):
  base_channels: int = 64
  num_layers: int = 3        # stride-2 layers after the first; receptive field grows with it
  num_groups: int = 32       # GroupNorm groups (capped by the channel count); 0 = no norm
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> patch logits [B, H', W', 1]."""
    def conv(features, strides, name):
      return layers.conv(features, 4, self.dtype, name, strides=strides,
                         padding=((1, 1), (1, 1)))

    def norm(h, name):
      if not self.num_groups:
        return h
      groups = min(self.num_groups, h.shape[-1])
      while h.shape[-1] % groups:
        groups -= 1
      return layers.group_norm(groups, 1e-6, self.dtype, name)(h)

    h = nn.leaky_relu(conv(self.base_channels, 2, "conv_in")(images.astype(self.dtype)), 0.2)
    for i in range(1, self.num_layers + 1):
      width = self.base_channels * min(2 ** i, 8)
      strides = 2 if i < self.num_layers else 1
      h = conv(width, strides, f"conv_{i}")(h)
      h = nn.leaky_relu(norm(h, f"norm_{i}"), 0.2)
    return conv(1, 1, "conv_out")(h).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), halved."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The generator's adversarial loss: -mean(D(x_hat))."""
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec_norm: jax.Array, grad_gan_norm: jax.Array,
                    max_weight: float = 1e4) -> jax.Array:
  """Esser et al. 2021 (eq. 7): ||grad_L(rec)|| / (||grad_L(gan)|| + 1e-4) at the decoder's
  last layer, clipped to [0, max_weight] and treated as a constant."""
  weight = grad_rec_norm / (grad_gan_norm + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))
