"""Vector quantisation for VQ autoencoders (van den Oord et al. 2017; Esser et al. 2021).

The encoder output z [..., D] is replaced by its nearest codebook entry; gradients pass to the
encoder straight through (z_q = z + sg(q - z)), the codebook learns from the codebook loss
||sg(z) - q||^2 and the encoder is pulled towards its code by the commitment loss
beta ||z - sg(q)||^2. With `l2_normalize` (Yu et al. 2022, "Vector-quantized Image Modeling
with Improved VQGAN") codes and inputs are compared on the unit sphere, which keeps many more
codes in use.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


class VectorQuantizer(nn.Module):
  num_codes: int
  dim: int
  beta: float = 0.25         # weight of the commitment loss
  l2_normalize: bool = False

  def setup(self):
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_out", "uniform"), ("vocab", "embed")),
        (self.num_codes, self.dim))

  def codes(self) -> jax.Array:
    book = self.codebook.astype(jnp.float32)
    return _normalize(book) if self.l2_normalize else book

  def __call__(self, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """z [..., D] -> (z_q with straight-through gradients, {loss, indices, perplexity, usage})."""
    if z.shape[-1] != self.dim:
      raise ValueError(f"VectorQuantizer(dim={self.dim}) got inputs with {z.shape[-1]} channels")
    flat = z.astype(jnp.float32).reshape(-1, self.dim)
    if self.l2_normalize:
      flat = _normalize(flat)
    book = self.codes()
    # ||z - e||^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 does not change the argmin.
    dist = jnp.sum(book * book, -1)[None] - 2 * flat @ book.T
    indices = jnp.argmin(dist, -1)
    q = book[indices]
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - q))
    commitment = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(q)))
    z_q = flat + jax.lax.stop_gradient(q - flat)
    counts = jnp.zeros(self.num_codes, jnp.float32).at[indices].add(1.0)
    probs = counts / indices.shape[0]
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10))))
    aux = {"loss": codebook_loss + self.beta * commitment,
           "indices": indices.reshape(z.shape[:-1]),
           "perplexity": perplexity,
           "usage": jnp.mean((counts > 0).astype(jnp.float32))}
    return z_q.reshape(z.shape).astype(z.dtype), aux

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code indices [...] -> code vectors [..., D] (decoding from tokens)."""
    return self.codes()[indices]
