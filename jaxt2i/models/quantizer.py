"""Vector quantisation for VQ autoencoders (van den Oord et al. 2017; Esser et al. 2021).

The encoder output z [..., D] is replaced by its nearest codebook entry; gradients pass to the
encoder straight through (z_q = z + sg(q - z)), the codebook learns from the codebook loss
||sg(z) - q||^2 and the encoder is pulled towards its code by the commitment loss
beta ||z - sg(q)||^2. With `l2_normalize` (Yu et al. 2022, "Vector-quantized Image Modeling
with Improved VQGAN") codes and inputs are compared on the unit sphere, which keeps many more
codes in use.

With `ema_decay > 0` the codebook is not learned by gradients but is the exponential moving
average of the encoder outputs assigned to each code (van den Oord et al. 2017, appendix A.1):

    N_k <- d N_k + (1 - d) n_k        m_k <- d m_k + (1 - d) sum_{i: code(i) = k} z_i
    e_k  = m_k / N~_k,  N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j  (Laplace smoothing)

Only the commitment loss remains. N and m are params the optimizer never moves: `__call__`
returns their new values under aux["ema_update"], and the task hands them to the trainer as
state updates (Task.loss's "state_updates"), applied after the optimizer step.
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
  ema_decay: float = 0.0     # > 0: EMA codebook (see the module docstring)
  ema_epsilon: float = 1e-5

  def setup(self):
    init = nn.initializers.variance_scaling(1.0, "fan_out", "uniform")
    shape = (self.num_codes, self.dim)
    if self.ema_decay > 0:
      # N starts at 1 per code, so m starts as the initial codebook.
      self.ema_cluster_size = self.param(
          "ema_cluster_size", nn.with_logical_partitioning(nn.initializers.ones, ("vocab",)),
          (self.num_codes,))
      self.ema_embed_sum = self.param(
          "ema_embed_sum", nn.with_logical_partitioning(init, ("vocab", "embed")), shape)
    else:
      self.codebook = self.param("codebook",
                                 nn.with_logical_partitioning(init, ("vocab", "embed")), shape)

  def codes(self) -> jax.Array:
    if self.ema_decay > 0:
      sizes = jax.lax.stop_gradient(self.ema_cluster_size.astype(jnp.float32))
      total = jnp.sum(sizes)
      smoothed = (sizes + self.ema_epsilon) / (total + self.num_codes * self.ema_epsilon) * total
      book = jax.lax.stop_gradient(self.ema_embed_sum.astype(jnp.float32)) / smoothed[:, None]
    else:
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
    if self.ema_decay > 0:
      d = self.ema_decay
      sums = jnp.zeros((self.num_codes, self.dim), jnp.float32).at[indices].add(
          jax.lax.stop_gradient(flat))
      aux["loss"] = self.beta * commitment  # the codebook follows the EMA, not a loss
      aux["ema_update"] = {
          "ema_cluster_size": d * self.ema_cluster_size.astype(jnp.float32) + (1 - d) * counts,
          "ema_embed_sum": d * self.ema_embed_sum.astype(jnp.float32) + (1 - d) * sums}
    return z_q.reshape(z.shape).astype(z.dtype), aux

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Code indices [...] -> code vectors [..., D] (decoding from tokens)."""
    return self.codes()[indices]
