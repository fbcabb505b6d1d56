"""Task: the DALL-E discrete VAE (Ramesh et al. 2021, Sec. 2.1 and App. A.2-A.3), stage one of
DALL-E, trained on images alone.

The evidence lower bound with a uniform prior over the codes, per image dimension so the loss
scale does not depend on the image size (the gradient directions, and so beta, mean what the
paper's per-image sums do):

    L = [ sum_pixels NLL(x | decoder(z)) + beta * sum_positions KL(q(z | x) || uniform) ]
        / (H * W * C)
    z = gumbel_softmax(encoder logits, temperature)

NLL is the logit-Laplace density of App. A.3 on pixels mapped to (0.1, 0.9), or, as an
option, the squared error (for images with exactly flat regions, where the logit-Laplace NLL
is unbounded: configs/dvae_shapes.py). The relaxation temperature is annealed from 1 towards
1/16 and beta rises linearly from 0 (App. A.2: 1/16 over the first 150k updates, beta to 6.6
over the first 5000). At inference the codes are the argmax tokens: `encode_tokens` / `decode_tokens`
are what the DALL-E transformer task uses.

Codebook restarts (optional, `model.restart_every`; not in the paper). On small data the argmax
codes collapse onto a few entries (configs/dvae_shapes.py: 19 of 512 in use), and detail
smaller than a token is lost. Every `restart_every` steps, codes unused for a while (an EMA of
per-batch counts, kept under params["code_usage"]) are restarted as k-means splits its worst
clusters: the used codes with the largest summed reconstruction error over the batch's token
positions each donate to one dead code. For a donor i with mean encoder features mu_i over its
positions, and its worst-reconstructed position p with features h_p, the dead code j takes i's
decoder row and i's logit plus a hyperplane,

    logit_j(h) = logit_i(h) + eps * (h - (h_p + mu_i) / 2) . (h_p - mu_i),

with eps setting the margin at h_p to `restart_margin` nats, or less where the plane would move
some logit of the batch by more than that: j wins the positions nearer h_p than mu_i (and at
most those of other codes within that margin of winning there), and training moves its
decoder row towards what they need. The restart is a function of the params, the batch and
the step, so a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxt2i.models.dvae import (LOGIT_LAPLACE_EPS, DiscreteVAE, check_fields, kl_to_uniform,
                                logit_laplace_nll, map_pixels, stats_to_pixels)
from jaxt2i.tasks.autoencoder import psnr
from jaxt2i.tasks.base import STATE_DELTAS, STATE_UPDATES, Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError

# DiscreteVAE fields of the task config (what a later stage reads from a dVAE run).
DVAE_FIELDS = ("vocab_size", "hidden", "init_width", "blocks_per_group", "downsample_factor",
               "channels")
RECONSTRUCTIONS = ("logit_laplace", "mse")
TEMPERATURE_SCHEDULES = ("cosine", "exponential")
# Codebook restarts (module docstring): the EMA decay of per-batch code counts; a code counted
# less than DEAD_BELOW times per batch (and not at all in the current one) is dead; a restarted
# code starts at RESTART_USAGE, so it is not restarted again for ~230 steps unless it is used.
USAGE_DECAY = 0.99
DEAD_BELOW = 0.1
RESTART_USAGE = 1.0


def dvae_from_config(model_cfg: Any, dtype: Any = jnp.float32) -> DiscreteVAE:
  """The DiscreteVAE of a "dvae" run's config.model (a ConfigDict or a dict)."""
  return DiscreteVAE(**{k: int(model_cfg[k]) for k in DVAE_FIELDS}, dtype=dtype)


def gumbel_temperature(step: jax.Array, start: float, end: float, steps: int,
                       schedule: str = "cosine") -> jax.Array:
  """The relaxation temperature at `step`: `start` at 0 to `end` at `steps`, then `end`.
  cosine: half a cosine between them; exponential: geometric (log-linear) decay."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  if schedule == "cosine":
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
  if schedule == "exponential":
    return start * (end / start) ** frac
  raise ValueError(f"temperature schedule {schedule!r}: choose one of {TEMPERATURE_SCHEDULES}")


def kl_weight_at(step: jax.Array, final: float, warmup_steps: int) -> jax.Array:
  """beta at `step`: linear from 0 to `final` over `warmup_steps`, then `final`."""
  if warmup_steps <= 0:
    return jnp.float32(final)
  return final * jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)


def codebook_usage(tokens: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
  """Perplexity exp(H(p)) of the code frequencies p over all positions of `tokens` (K when
  every code is used equally, 1 when one code is), and the fraction of codes never used."""
  counts = jnp.bincount(tokens.reshape(-1), length=vocab_size).astype(jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "dead_codes": jnp.mean(counts == 0)}


@register
class DiscreteVAETask(Task):
  name = "dvae"
  batch_keys = ("image",)
  uses_text = False
  needs_step = True  # the temperature and beta schedules

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.vocab_size = 512               # codebook size K (paper: 8192)
    m.hidden = 64                    # first encoder / last decoder group width (paper: 256)
    m.init_width = 64                # decoder width after its code input conv (paper: 128)
    m.blocks_per_group = 1           # residual blocks per group (paper: 2)
    m.downsample_factor = 4          # image side / token-grid side, a power of two (paper: 8)
    m.channels = 3                   # image channels
    m.reconstruction = "logit_laplace"  # logit_laplace (App. A.3) | mse
    # beta, with the loss per image dimension (module docstring). The paper's 6.6 is for f = 8,
    # i.e. 192 image dimensions per token: the KL is summed over tokens and the NLL over
    # dimensions, so at f = 4 (48 per token) the same pull towards the uniform posterior is
    # 6.6 * 48 / 192 ~ 1.6. The codebook size does not change it: a confident posterior costs
    # beta * log K nats for its log K nats of information at any K, so small codebooks keep
    # the paper's value. With reconstruction=mse the unit is squared pixel error, not nats:
    # scale by 2 sigma^2 for the pixel noise sigma the squared error stands for.
    m.kl_weight = 1.6                # final beta
    m.kl_warmup_steps = 5000         # beta rises linearly from 0 over these steps (paper: 5000)
    m.temperature_start = 1.0        # gumbel-softmax temperature at step 0 (paper: 1)
    m.temperature_end = 1.0 / 16     # ... annealed to this (paper: 1/16)
    m.temperature_steps = 150_000    # ... over these steps (paper: 150k)
    m.temperature_schedule = "cosine"  # cosine | exponential
    # Codebook restarts (module docstring; not in the paper): every N steps from step
    # restart_start, up to restart_count unused codes restart on the worst-reconstructed
    # positions; none from step restart_until on (0: to the end). 0 turns them off.
    m.restart_every = 0
    m.restart_count = 32
    m.restart_start = 0
    m.restart_until = 0
    m.restart_margin = 1.0           # nats a restarted code leads its donor by at its seed
    return m

  def validate(self) -> None:
    super().validate()
    m = self.config.model
    try:
      check_fields(**{k: m[k] for k in DVAE_FIELDS})
    except ValueError as e:
      raise ConfigError(f"config.model.{e}") from None
    size = self.config.data.image_size
    if size % m.downsample_factor:
      raise ConfigError(f"config.data.image_size={size} is not divisible by "
                        f"config.model.downsample_factor={m.downsample_factor}")
    if m.reconstruction not in RECONSTRUCTIONS:
      raise ConfigError(f"config.model.reconstruction={m.reconstruction!r}: choose one of "
                        f"{list(RECONSTRUCTIONS)}")
    if m.temperature_schedule not in TEMPERATURE_SCHEDULES:
      raise ConfigError(f"config.model.temperature_schedule={m.temperature_schedule!r}: "
                        f"choose one of {list(TEMPERATURE_SCHEDULES)}")
    if not 0 < m.temperature_end <= m.temperature_start:
      raise ConfigError(f"config.model.temperature_end={m.temperature_end} must be in "
                        f"(0, temperature_start={m.temperature_start}]")
    for name in ("kl_weight", "kl_warmup_steps", "temperature_steps", "restart_every",
                 "restart_count", "restart_start", "restart_until", "restart_margin"):
      if not isinstance(m[name], (int, float)) or isinstance(m[name], bool) or m[name] < 0:
        raise ConfigError(f"config.model.{name}={m[name]!r}: must be >= 0")
    if m.restart_every and self.config.train.grad_accum_steps != 1:
      raise ConfigError(f"config.model.restart_every={m.restart_every} needs "
                        f"train.grad_accum_steps=1 (got {self.config.train.grad_accum_steps}): "
                        "a restart is made from one whole batch")

  @property
  def frozen_keys(self) -> tuple[str, ...]:
    # The code-usage EMA is state, not learned: set by the loss's state updates.
    return ("code_usage",) if self.config.model.restart_every else ()

  @property
  def model(self) -> DiscreteVAE:
    return dvae_from_config(self.config.model, self.compute_dtype)

  def _to_unit(self, images: jax.Array) -> jax.Array:
    """Images in config.data.value_range -> [0, 1]."""
    low, high = self.config.data.value_range
    return jnp.clip((images.astype(jnp.float32) - low) / (high - low), 0.0, 1.0)

  def _from_unit(self, images: jax.Array) -> jax.Array:
    low, high = self.config.data.value_range
    return images * (high - low) + low

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    params = {"dvae": self.model.init(rng, self._to_unit(batch["image"]))["params"]}
    if self.config.model.restart_every:
      params["code_usage"] = jnp.zeros((self.config.model.vocab_size,), jnp.float32)
    return params

  def encode_tokens(self, params: PyTree, images: jax.Array) -> jax.Array:
    """Images [B, H, W, C] in config.data.value_range -> int32 tokens [B, H/f, W/f]."""
    return self.model.apply({"params": params["dvae"]}, self._to_unit(images), method="encode")

  def decode_tokens(self, params: PyTree, tokens: jax.Array) -> jax.Array:
    """Tokens [B, h, w] -> float32 images [B, h*f, w*f, C] in config.data.value_range."""
    return self._from_unit(self.model.apply({"params": params["dvae"]}, tokens,
                                            method="decode"))

  def _reconstruction(self, x01: jax.Array, stats: jax.Array) -> tuple[jax.Array, dict]:
    """Per-image sum of the reconstruction term [B], and its per-dimension metric."""
    target = map_pixels(x01)
    if self.config.model.reconstruction == "logit_laplace":
      per_elem = logit_laplace_nll(target, stats)
      name = "nll"
    else:
      # The squared error of the decoder's mean in [0, 1] pixel units (the mapping's scale
      # divided out, the clip of unmap_pixels left off so no gradient is cut).
      mu = jax.nn.sigmoid(jnp.split(stats, 2, axis=-1)[0])
      per_elem = jnp.square((mu - target) / (1.0 - 2.0 * LOGIT_LAPLACE_EPS))
      name = "mse"
    per_image = per_elem.reshape(per_elem.shape[0], -1).sum(-1)
    return per_image, {name: jnp.mean(per_elem)}

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, dict]:
    m = self.config.model
    x01 = self._to_unit(batch["image"])
    temperature = gumbel_temperature(step, m.temperature_start, m.temperature_end,
                                     m.temperature_steps, m.temperature_schedule)
    beta = kl_weight_at(step, m.kl_weight, m.kl_warmup_steps)
    stats, logits, features = self.model.apply({"params": params["dvae"]}, x01, rng,
                                                temperature, return_features=True)
    rec, metrics = self._reconstruction(x01, stats)
    kl = kl_to_uniform(logits)
    dims = x01[0].size
    loss = jnp.mean(rec + beta * kl) / dims
    # What inference sees: the argmax tokens, decoded without the relaxation.
    tokens = jnp.argmax(logits, axis=-1)
    hard = stats_to_pixels(self.model.apply({"params": jax.lax.stop_gradient(params["dvae"])},
                                            tokens, method="decode_stats"))
    metrics.update(
        rec_loss=jnp.mean(rec) / dims, kl=jnp.mean(kl) / math.prod(logits.shape[1:3]),
        temperature=temperature, kl_weight=beta, psnr=psnr(hard, x01, (0.0, 1.0)),
        **codebook_usage(tokens, m.vocab_size))
    if m.restart_every:
      metrics.update(self._restarts(params, features, tokens, hard, x01, step))
    return loss, metrics

  def _restarts(self, params: PyTree, features: jax.Array, tokens: jax.Array,
                hard: jax.Array, x01: jax.Array, step: jax.Array) -> dict[str, Any]:
    """The code-usage update and, at restart steps, the restart of dead codes (module
    docstring) as state deltas; metrics `restarted` and `live_codes` (codes above DEAD_BELOW
    in the usage EMA)."""
    m = self.config.model
    k, f = m.vocab_size, m.downsample_factor
    feats = jax.lax.stop_gradient(features).reshape(-1, features.shape[-1])
    tok = tokens.reshape(-1)
    b, h, w = tokens.shape
    # Squared error of the argmax-token reconstruction per token's pixel patch.
    err = jnp.square(hard - x01).reshape(b, h, f, w, f, -1).sum((2, 4, 5)).reshape(-1)
    counts = jnp.bincount(tok, length=k).astype(jnp.float32)
    usage = USAGE_DECAY * params["code_usage"] + (1.0 - USAGE_DECAY) * counts
    dead = (usage < DEAD_BELOW) & (counts == 0)
    now = (step > 0) & (step >= m.restart_start) & (step % m.restart_every == 0)
    if m.restart_until:
      now &= step < m.restart_until
    n = min(m.restart_count, k)
    (targets,) = jnp.nonzero(dead, size=n, fill_value=k)  # k: no dead code left
    # The donors: the n codes with the largest summed error (at most one restart each, so
    # restarts do not compete for one cluster); each one's seed is its worst position.
    distortion = jnp.zeros((k,), jnp.float32).at[tok].add(err)
    seed_err, donors = jax.lax.top_k(distortion, n)
    worst = jnp.zeros((k,), jnp.float32).at[tok].max(err)
    index = jnp.arange(tok.shape[0])
    seed_of = jnp.full((k,), tok.shape[0]).at[tok].min(
        jnp.where(err == worst[tok], index, tok.shape[0]))
    seeds = jnp.minimum(seed_of[donors], tok.shape[0] - 1)
    mean = (jnp.zeros((k, feats.shape[-1]), jnp.float32).at[tok].add(feats)
            / jnp.maximum(counts, 1.0)[:, None])
    d = feats[seeds] - mean[donors]                           # [n, F]
    dist2 = jnp.sum(d * d, axis=-1)
    ok = now & (targets < k) & (seed_err > 0) & (counts[donors] > 1) & (dist2 > 1e-12)
    mid = (feats[seeds] + mean[donors]) / 2.0
    # The hyperplane's reach over the batch: |d . (h - mid)| at its farthest position. A
    # tight cluster (a small |d|) would otherwise get a steep plane that hands the new code
    # every position on its side, other codes' included.
    reach = jnp.max(jnp.abs(feats @ d.T - jnp.sum(d * mid, axis=-1)), axis=0)
    eps = jnp.minimum(2.0 * m.restart_margin / jnp.maximum(dist2, 1e-12),
                      m.restart_margin / jnp.maximum(reach, 1e-12))
    offset = eps * jnp.sum(d * mid, axis=-1)
    targets = jnp.where(ok, targets, k)                       # out of range: dropped
    enc = jax.lax.stop_gradient(params["dvae"]["encoder"]["output"])
    dec = jax.lax.stop_gradient(params["dvae"]["decoder"]["input"]["kernel"])
    kernel = enc["kernel"][0, 0]                              # [F, K]
    new_kernel = kernel.at[:, targets].set(kernel[:, donors] + (eps[:, None] * d).T,
                                           mode="drop")
    new_bias = enc["bias"].at[targets].set(enc["bias"][donors] - offset, mode="drop")
    new_dec = dec[0, 0].at[targets].set(dec[0, 0][donors], mode="drop")
    deltas = {"dvae": {
        "encoder": {"output": {"kernel": (new_kernel - kernel)[None, None],
                               "bias": new_bias - enc["bias"]}},
        "decoder": {"input": {"kernel": (new_dec - dec[0, 0])[None, None]}}}}
    usage = usage.at[targets].set(RESTART_USAGE, mode="drop")
    return {STATE_DELTAS: deltas, STATE_UPDATES: {"code_usage": usage},
            "restarted": jnp.sum(ok), "live_codes": jnp.sum(usage >= DEAD_BELOW)}

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    del rng
    x01 = self._to_unit(batch["image"])
    tokens = self.model.apply({"params": params["dvae"]}, x01, method="encode")
    recon = self.model.apply({"params": params["dvae"]}, tokens, method="decode")

    def to_uint8(v):
      return jnp.clip(v[:8] * 255 + 0.5, 0, 255).astype(jnp.uint8)
    return {"psnr": psnr(recon, x01, (0.0, 1.0)),
            **codebook_usage(tokens, self.config.model.vocab_size),
            "reconstructions": to_uint8(recon), "originals": to_uint8(x01)}
