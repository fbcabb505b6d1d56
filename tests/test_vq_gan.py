"""Vector quantizer and PatchGAN discriminator: equations, gradients, receptive field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models.discriminator import (PatchDiscriminator, adaptive_weight, generator_loss,
                                         hinge_d_loss)
from jaxt2i.models.quantizer import VectorQuantizer
from jaxt2i.parallel import partitioning


def _init(module, x):
  return partitioning.unbox(module.init(jax.random.key(0), x)["params"])


def test_quantizer_picks_nearest_code_and_losses_match():
  vq = VectorQuantizer(num_codes=16, dim=4, beta=0.25)
  z = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
  params = _init(vq, z)
  z_q, aux = vq.apply({"params": params}, z)
  book = np.asarray(params["codebook"])
  flat = np.asarray(z).reshape(-1, 4)
  dist = ((flat[:, None] - book[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(aux["indices"]).ravel(), dist.argmin(1))
  np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 4), book[dist.argmin(1)], atol=1e-6)
  mse = ((flat - book[dist.argmin(1)]) ** 2).mean()
  np.testing.assert_allclose(aux["loss"], 1.25 * mse, rtol=1e-5)
  np.testing.assert_allclose(vq.apply({"params": params}, aux["indices"], method="lookup"), z_q,
                             atol=1e-6)
  used = len(set(dist.argmin(1).tolist()))
  assert float(aux["usage"]) == pytest.approx(used / 16)
  assert 1.0 <= float(aux["perplexity"]) <= used + 1e-4


def test_straight_through_and_codebook_gradients():
  vq = VectorQuantizer(num_codes=8, dim=3, beta=0.5)
  z = jax.random.normal(jax.random.key(2), (5, 3))
  params = _init(vq, z)

  def out_sum(z):
    return jnp.sum(vq.apply({"params": params}, z)[0] * jnp.arange(1.0, 4.0))
  # The quantized output passes the downstream gradient to z unchanged.
  np.testing.assert_allclose(jax.grad(out_sum)(z), np.tile([1.0, 2.0, 3.0], (5, 1)), atol=1e-6)

  def loss(params, z):
    return vq.apply({"params": params}, z)[1]["loss"]
  g_book, g_z = jax.grad(loss, argnums=(0, 1))(params, z)
  idx = np.asarray(vq.apply({"params": params}, z)[1]["indices"])
  book = np.asarray(params["codebook"])
  # d/dz: commitment only, 2 beta (z - q) / N; d/dcodebook: 2 (q - z) / N summed per code.
  n = z.size
  np.testing.assert_allclose(g_z, 2 * 0.5 * (np.asarray(z) - book[idx]) / n, atol=1e-6)
  expected = np.zeros_like(book)
  np.add.at(expected, idx, 2 * (book[idx] - np.asarray(z)) / n)
  np.testing.assert_allclose(g_book["codebook"], expected, atol=1e-6)


def test_ema_codebook_follows_its_assigned_inputs():
  """EMA mode (van den Oord et al. 2017, A.1): the update equations, Laplace smoothing, only the
  commitment loss, and no gradient into the statistics."""
  k, d, decay, eps = 8, 3, 0.9, 1e-5
  vq = VectorQuantizer(num_codes=k, dim=d, beta=0.25, ema_decay=decay, ema_epsilon=eps)
  z = jax.random.normal(jax.random.key(4), (20, d))
  params = _init(vq, z)
  assert set(params) == {"ema_cluster_size", "ema_embed_sum"}
  params = {"ema_cluster_size": jnp.arange(1.0, k + 1), "ema_embed_sum": params["ema_embed_sum"]}
  sizes, sums = np.asarray(params["ema_cluster_size"]), np.asarray(params["ema_embed_sum"])
  smoothed = (sizes + eps) / (sizes.sum() + k * eps) * sizes.sum()
  book = sums / smoothed[:, None]
  np.testing.assert_allclose(vq.apply({"params": params}, method="codes"), book, rtol=1e-6)
  z_q, aux = vq.apply({"params": params}, z)
  flat = np.asarray(z)
  idx = ((flat[:, None] - book[None]) ** 2).sum(-1).argmin(1)
  np.testing.assert_array_equal(np.asarray(aux["indices"]), idx)
  counts = np.bincount(idx, minlength=k).astype(np.float32)
  assigned = np.zeros((k, d), np.float32)
  np.add.at(assigned, idx, flat)
  update = aux["ema_update"]
  np.testing.assert_allclose(update["ema_cluster_size"], decay * sizes + (1 - decay) * counts,
                             rtol=1e-6)
  np.testing.assert_allclose(update["ema_embed_sum"], decay * sums + (1 - decay) * assigned,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["loss"], 0.25 * ((flat - book[idx]) ** 2).mean(), rtol=1e-5)
  grads = jax.grad(lambda p: vq.apply({"params": p}, z)[1]["loss"])(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_l2_normalized_codes_and_bad_width():
  vq = VectorQuantizer(num_codes=8, dim=4, l2_normalize=True)
  z = 3.0 * jax.random.normal(jax.random.key(3), (6, 4))
  params = _init(vq, z)
  z_q, _ = vq.apply({"params": params}, z)
  np.testing.assert_allclose(jnp.linalg.norm(z_q, axis=-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="dim=4.*5 channels"):
    vq.apply({"params": params}, jnp.zeros((2, 5)))


def test_patch_discriminator_shape_and_receptive_field():
  disc = PatchDiscriminator(base_channels=8, num_layers=3)
  x = jnp.zeros((1, 128, 128, 3))
  params = _init(disc, x)
  out = disc.apply({"params": params}, x)
  assert out.shape == (1, 14, 14, 1)  # 128 -> 64 -> 32 -> 16 -> 15 -> 14
  assert np.isfinite(np.asarray(out)).all()
  # Without GroupNorm (whose statistics span the image) each logit sees one patch.
  plain = PatchDiscriminator(base_channels=8, num_layers=3, num_groups=0)
  plain_params = _init(plain, x)

  def one_logit(x):
    return plain.apply({"params": plain_params}, x)[0, 7, 7, 0]
  g = np.abs(np.asarray(jax.jit(jax.grad(one_logit))(
      jax.random.normal(jax.random.key(4), x.shape))))
  rows = np.flatnonzero(g.sum((0, 2, 3)) > 0)
  cols = np.flatnonzero(g.sum((0, 1, 3)) > 0)
  # The classic 70x70 PatchGAN.
  assert rows[-1] - rows[0] + 1 == 70 and cols[-1] - cols[0] + 1 == 70


def test_adversarial_losses():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
  assert float(generator_loss(fake)) == pytest.approx(1.0)
  assert float(adaptive_weight(jnp.array(2.0), jnp.array(0.5))) == pytest.approx(2 / 0.5001)
  assert float(adaptive_weight(jnp.array(1.0), jnp.array(0.0))) == pytest.approx(1e4)
  assert float(jax.grad(lambda a: adaptive_weight(a, jnp.array(1.0)))(jnp.array(1.0))) == 0.0
