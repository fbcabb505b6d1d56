"""Task: the first stage of latent diffusion, a KL or VQ autoencoder trained with a PatchGAN.

Loss (Esser et al. 2021, eq. 5-7; Rombach et al. 2022, appendix G), all terms per image
element so the weights mean what SD's do:

    L = |x - x_hat|_1 [+ perceptual_weight * LPIPS(x, x_hat), with user-supplied weights]
        + kl_weight * KL (or the VQ codebook + commitment loss)
        + on(step >= disc_start) * (lambda * disc_weight * -D(x_hat) + hinge(D(x), D(x_hat)))

lambda is the adaptive weight: the ratio of the gradient norms of the reconstruction and
adversarial terms at the decoder's last layer. Generator and discriminator share one optimizer
step: each term only reaches its own half of the params (the discriminator is held constant
in the generator term, the reconstruction in the discriminator term), which is what the
usual alternating updates compute, without a second optimizer.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from jaxt2i.models.autoencoder import Autoencoder, kl_divergence
from jaxt2i.models.discriminator import (PatchDiscriminator, adaptive_weight, generator_loss,
                                         hinge_d_loss)
from jaxt2i.models.lpips import LPIPS, load_lpips_params
from jaxt2i.tasks.base import STATE_UPDATES, Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError


def psnr(x: jax.Array, y: jax.Array, value_range: tuple[float, float]) -> jax.Array:
  """Mean PSNR (dB) over the batch, for images in `value_range`."""
  low, high = value_range
  mse = jnp.mean(jnp.square((x - y) / (high - low)), axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


@register
class AutoencoderTask(Task):
  name = "autoencoder"
  batch_keys = ("image",)
  uses_text = False
  needs_step = True

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.kind = "kl"                    # kl | vq
    m.latent_channels = 4
    m.block_out_channels = (64, 128, 128)  # levels; downsampling factor 2^(levels - 1)
    m.layers_per_block = 1
    m.norm_groups = 16
    m.mid_attention = True
    m.num_codes = 1024               # vq: codebook size
    m.vq_beta = 0.25                 # vq: commitment weight
    m.vq_l2_normalize = True         # vq: codes on the unit sphere (better codebook usage)
    m.vq_ema_decay = 0.0             # vq: 0 = codebook learned by its loss (straight-through);
                                     # e.g. 0.99 = codebook as an EMA of its assigned inputs
    m.kl_weight = 1e-6               # kl: weight of the KL term (SD's value)
    m.disc_weight = 0.5              # 0 = no adversarial loss (and no discriminator)
    m.disc_start = 2000              # step at which the adversarial terms switch on
    m.disc_channels = 64
    m.disc_layers = 2
    m.perceptual_weights = ""        # LPIPS term: VGG-16 + LPIPS head weight files, comma-
                                     # separated (models/lpips.py); '' = no perceptual term
    m.perceptual_weight = 1.0        # its weight (taming / LDM: 1.0)
    return m

  def validate(self) -> None:
    super().validate()
    m = self.config.model
    if m.kind not in ("kl", "vq"):
      raise ConfigError(f"config.model.kind={m.kind!r}: choose 'kl' or 'vq'")
    if not 0.0 <= m.vq_ema_decay < 1.0:
      raise ConfigError(f"config.model.vq_ema_decay={m.vq_ema_decay}: must be in [0, 1)")
    for path in filter(None, (p.strip() for p in m.perceptual_weights.split(","))):
      if not os.path.isfile(path):
        raise ConfigError(f"config.model.perceptual_weights: {path} does not exist (nothing is "
                          "downloaded: give local VGG-16 and LPIPS head weight files, see "
                          "jaxt2i/models/lpips.py)")
    factor = 2 ** (len(m.block_out_channels) - 1)
    if self.config.data.image_size % factor:
      raise ConfigError(f"config.data.image_size={self.config.data.image_size} is not "
                        f"divisible by the downsampling factor {factor}")
    for c in m.block_out_channels:
      if c % m.norm_groups:
        raise ConfigError(f"config.model.block_out_channels={tuple(m.block_out_channels)}: "
                          f"each must be divisible by norm_groups={m.norm_groups}")

  @property
  def model(self) -> Autoencoder:
    m = self.config.model
    return Autoencoder(kind=m.kind, latent_channels=m.latent_channels,
                       block_out_channels=tuple(m.block_out_channels),
                       layers_per_block=m.layers_per_block, groups=m.norm_groups,
                       mid_attention=m.mid_attention, num_codes=m.num_codes,
                       vq_beta=m.vq_beta, vq_l2_normalize=m.vq_l2_normalize,
                       vq_ema_decay=m.vq_ema_decay, dtype=self.compute_dtype)

  @property
  def perceptual(self) -> bool:
    return bool(self.config.model.perceptual_weights.strip())

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    return ("perceptual",) if self.perceptual else ()

  def initial_values(self) -> dict[str, PyTree] | None:
    """The LPIPS network, read from the user's files in a fresh run (then frozen)."""
    if not self.perceptual:
      return None
    return {"perceptual": load_lpips_params(self.config.model.perceptual_weights)}

  def _reconstruction_loss(self, params: PyTree, x: jax.Array, recon: jax.Array):
    """L1 (+ perceptual_weight * LPIPS) per image element, and the LPIPS term (or None)."""
    rec = jnp.mean(jnp.abs(x - recon))
    if not self.perceptual:
      return rec, None
    lpips = jnp.mean(LPIPS(dtype=self.compute_dtype).apply(
        {"params": jax.lax.stop_gradient(params["perceptual"])}, x, recon))
    return rec + self.config.model.perceptual_weight * lpips, lpips

  @property
  def discriminator(self) -> PatchDiscriminator:
    m = self.config.model
    return PatchDiscriminator(base_channels=m.disc_channels, num_layers=m.disc_layers,
                              num_groups=m.norm_groups, dtype=self.compute_dtype)

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    r1, r2, r3 = jax.random.split(rng, 3)
    params = {"autoencoder": self.model.init(r1, batch["image"])["params"]}
    if self.config.model.disc_weight > 0:
      params["discriminator"] = self.discriminator.init(r2, batch["image"])["params"]
    if self.perceptual:  # zeros, replaced by the user's weights (initial_values)
      image = batch["image"][:1]
      shapes = jax.eval_shape(LPIPS().init, r3, image, image)["params"]
      params["perceptual"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return params

  def reconstruct(self, params: PyTree, images: jax.Array, rng: jax.Array | None = None):
    return self.model.apply({"params": params["autoencoder"]}, images, rng)

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, dict]:
    m = self.config.model
    x = batch["image"]
    ae = params["autoencoder"]
    recon, features, post = self.model.apply({"params": ae}, x, rng, return_features=True)
    recon = recon.astype(jnp.float32)
    rec, lpips = self._reconstruction_loss(params, x, recon)
    elements = x[0].size
    metrics = {"l1": jnp.mean(jnp.abs(x - recon)),
               "psnr": psnr(recon, x, tuple(self.config.data.value_range))}
    if lpips is not None:
      metrics["perceptual"] = lpips
    if m.kind == "kl":
      kl = jnp.mean(kl_divergence(post["mean"], post["logvar"])) / elements
      loss = rec + m.kl_weight * kl
      metrics["kl"] = kl
    else:
      loss = rec + post["loss"]
      metrics.update(vq_loss=post["loss"], perplexity=post["perplexity"], usage=post["usage"])
      if "ema_update" in post:
        metrics[STATE_UPDATES] = {"autoencoder": {"quantizer": post["ema_update"]}}
    if m.disc_weight > 0:
      # Computed always and gated by a multiply: under lax.cond the GAN branch ran 5x slower
      # on XLA:CPU (1.33 vs 0.28 s for a batch-8 step of the demo autoencoder).
      on = (step >= m.disc_start).astype(jnp.float32)
      gan, gan_metrics = self._gan_terms(params, x=x, recon=recon, features=features)
      loss = loss + on * gan
      metrics.update(gan_metrics, disc_on=on)
    return loss, metrics

  def _gan_terms(self, params: PyTree, *, x: jax.Array, recon: jax.Array, features: jax.Array):
    """lambda * disc_weight * -D(x_hat) + hinge(D(x), D(x_hat)), and their metrics."""
    ae, disc = params["autoencoder"], params["discriminator"]
    frozen_disc = jax.lax.stop_gradient(disc)
    kernel = ae["decoder"]["conv_out"]["kernel"]
    bias = ae["decoder"]["conv_out"]["bias"]
    feats = jax.lax.stop_gradient(features)

    def out_from_kernel(w):
      y = jax.lax.conv_general_dilated(feats.astype(jnp.float32), w, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y + bias

    def g_of(images):
      return generator_loss(self.discriminator.apply({"params": frozen_disc}, images))
    g = g_of(recon)
    # The reconstruction side of the ratio is the whole reconstruction loss (L1 + LPIPS).
    grad_rec = jax.grad(lambda w: self._reconstruction_loss(params, x, out_from_kernel(w))[0])(
        kernel)
    grad_gan = jax.grad(lambda w: g_of(out_from_kernel(w)))(kernel)
    weight = self.config.model.disc_weight * adaptive_weight(jnp.linalg.norm(grad_rec),
                                                             jnp.linalg.norm(grad_gan))
    logits_real = self.discriminator.apply({"params": disc}, x)
    logits_fake = self.discriminator.apply({"params": disc}, jax.lax.stop_gradient(recon))
    d_loss = hinge_d_loss(logits_real, logits_fake)
    return weight * g + d_loss, {"g_loss": g, "d_loss": d_loss, "d_weight": weight,
                                 "logits_real": jnp.mean(logits_real),
                                 "logits_fake": jnp.mean(logits_fake)}

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    del rng
    x = batch["image"]
    recon, _ = self.reconstruct(params, x)  # the posterior mean: deterministic
    recon = recon.astype(jnp.float32)
    low, high = self.config.data.value_range

    def to_uint8(v):
      return jnp.clip((v[:8] - low) / (high - low) * 255 + 0.5, 0, 255).astype(jnp.uint8)
    return {"psnr": psnr(recon, x, (low, high)), "l1": jnp.mean(jnp.abs(recon - x)),
            "reconstructions": to_uint8(recon), "originals": to_uint8(x)}
