"""The DALL-E discrete VAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation",
Sec. 2.1 and Appendix A).

Stage one of DALL-E: an encoder turns an image into a grid of logits over a codebook of
`vocab_size` codes; a decoder turns one-hot codes (or their gumbel-softmax relaxation during
training) back into the parameters of a logit-Laplace distribution over pixels. The layout is
OpenAI's `dall_e` package module for module, so its published encoder.pkl / decoder.pkl
convert by name (jaxt2i/convert/dall_e.py):

    encoder: 7x7 conv -> groups 1..G of `blocks_per_group` residual blocks of widths
             hidden * (1, 2, 4, ...), a 2x2 max-pool after each group but the last
             -> ReLU, 1x1 conv to the code logits
    decoder: 1x1 conv from the codes to `init_width` -> groups 1..G of widths
             hidden * (..., 4, 2, 1), nearest 2x upsampling after each group but the last
             -> ReLU, 1x1 conv to 2 * channels (logit-Laplace mu and log-scale)

with G = log2(downsample_factor) + 1 (the paper: f = 8, G = 4, 256 px -> 32 x 32 codes). A
residual block is id(x) + post_gain * res(x): id is a 1x1 conv where the width changes, res is
ReLU-conv x4 (kernels 3, 3, 3, 1 in the encoder, 1, 3, 3, 3 in the decoder) at a quarter of
the block width, and post_gain = 1 / (G * blocks_per_group)^2 keeps the residual stack near
the identity at init (App. A.1). Layout NHWC; pixels enter and leave in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers

# App. A.3: pixels are squeezed into (eps, 1 - eps) so the logit-Laplace density, which lives
# on (0, 1), never sees the 0 and 1 where its logit is infinite.
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
  """[0, 1] -> [eps, 1 - eps]: what the encoder reads and the decoder's density models."""
  return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
  """The inverse of map_pixels, clipped to [0, 1]."""
  return jnp.clip((x - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def logit_laplace_nll(x: jax.Array, stats: jax.Array) -> jax.Array:
  """Per-element negative log-likelihood of mapped pixels under the logit-Laplace density
  (App. A.3),

      f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)),

  for x [..., C] in (0, 1) (map_pixels output) and decoder stats [..., 2C] = (mu, log b).
  Returns [..., C] float32 (nats). It has no lower bound (mu = logit(x), b -> 0): on images
  with exactly flat regions the decoder can chase it there instead of encoding content.
  """
  x = x.astype(jnp.float32)
  mu, log_b = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
  logit = jnp.log(x) - jnp.log1p(-x)
  return (math.log(2.0) + log_b + jnp.log(x) + jnp.log1p(-x)
          + jnp.abs(logit - mu) * jnp.exp(-log_b))


def stats_to_pixels(stats: jax.Array) -> jax.Array:
  """Decoder stats [..., 2C] -> the reconstruction in [0, 1]: unmap(sigmoid(mu)), as the
  `dall_e` package decodes (the density's median)."""
  mu = jnp.split(stats.astype(jnp.float32), 2, axis=-1)[0]
  return unmap_pixels(jax.nn.sigmoid(mu))


def gumbel_softmax(rng: jax.Array, logits: jax.Array, temperature: jax.Array | float
                   ) -> jax.Array:
  """The relaxed one-hot sample softmax((logits + Gumbel noise) / temperature) over the last
  axis (Jang et al. 2016; Sec. 2.1 relaxes the categorical code posterior with it, in the
  forward pass too)."""
  logits = logits.astype(jnp.float32)
  noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
  return jax.nn.softmax((logits + noise) / temperature, axis=-1)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
  """KL(q || uniform) of the code posterior q = softmax(logits) [B, h, w, K], summed over the
  positions: per example [B] (nats). It is log K - H(q) at each position."""
  logits = logits.astype(jnp.float32)
  log_q = jax.nn.log_softmax(logits, axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q + math.log(logits.shape[-1])), axis=-1)
  return kl.reshape(kl.shape[0], -1).sum(-1)


def check_fields(vocab_size: int, hidden: int, init_width: int, blocks_per_group: int,
                 downsample_factor: int, channels: int) -> None:
  """Raises ValueError naming the first field the architecture cannot be built with."""
  factor = downsample_factor
  if not isinstance(factor, int) or factor < 2 or factor & (factor - 1):
    raise ValueError(f"downsample_factor={factor!r}: must be a power of two >= 2 (one 2x "
                     "max-pool per encoder group; the paper uses 8)")
  if not isinstance(vocab_size, int) or vocab_size < 2:
    raise ValueError(f"vocab_size={vocab_size!r}: need an int >= 2 codes (the paper uses 8192)")
  if not isinstance(hidden, int) or hidden < 4 or hidden % 4:
    raise ValueError(f"hidden={hidden!r}: must be a positive multiple of 4 (residual paths "
                     "run at a quarter of the block width)")
  for name, value in (("init_width", init_width), ("blocks_per_group", blocks_per_group),
                      ("channels", channels)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}: must be a positive int")


def num_groups(downsample_factor: int) -> int:
  """Residual groups per encoder / decoder: one per 2x resolution step, plus the last."""
  return int(math.log2(downsample_factor)) + 1


class ResBlock(nn.Module):
  """id_path(x) + post_gain * res_path(x) (the `dall_e` EncoderBlock / DecoderBlock)."""
  width: int                       # output channels; the res path runs at width // 4
  kernels: tuple[int, ...]         # the res path's four kernels: (3, 3, 3, 1) encoder,
                                   # (1, 3, 3, 3) decoder
  post_gain: float                 # 1 / (total blocks)^2
  dtype: Any = jnp.float32         # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hid = self.width // 4
    h = x
    for i, k in enumerate(self.kernels):
      out = self.width if i == len(self.kernels) - 1 else hid
      h = layers.conv(out, k, self.dtype, f"conv_{i + 1}", padding=(k - 1) // 2)(nn.relu(h))
    if x.shape[-1] != self.width:
      x = layers.conv(self.width, 1, self.dtype, "id_path", padding=0)(x)
    return x.astype(h.dtype) + self.post_gain * h


class Encoder(nn.Module):
  """Mapped pixels [B, H, W, channels] -> float32 code logits [B, H/f, W/f, vocab_size] (and,
  with `return_features`, the ReLU features [B, H/f, W/f, last group width] they are a
  1x1 conv of)."""
  vocab_size: int = 8192
  hidden: int = 256
  blocks_per_group: int = 2
  downsample_factor: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, return_features: bool = False
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    groups = num_groups(self.downsample_factor)
    gain = 1.0 / (groups * self.blocks_per_group) ** 2
    h = layers.conv(self.hidden, 7, self.dtype, "input", padding=3)(x)
    for g in range(1, groups + 1):
      for b in range(1, self.blocks_per_group + 1):
        h = ResBlock(self.hidden * 2 ** (g - 1), (3, 3, 3, 1), gain, self.dtype,
                     name=f"group_{g}_block_{b}")(h)
      if g < groups:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
    # float32 logits, as `dall_e` keeps this conv out of float16: they feed a softmax over
    # thousands of codes.
    h = nn.relu(h).astype(jnp.float32)
    logits = layers.conv(self.vocab_size, 1, jnp.float32, "output", padding=0)(h)
    return (logits, h) if return_features else logits


class CodeInput(nn.Module):
  """The decoder's first layer: a 1x1 conv from the codes (kernel [1, 1, vocab, width], as in
  `dall_e`). Integer tokens [B, h, w] take a row of the kernel instead of multiplying a
  one-hot (the same numbers, without a [B, h, w, vocab] array)."""
  vocab_size: int
  width: int

  @nn.compact
  def __call__(self, codes: jax.Array) -> jax.Array:
    # Unit-variance rows, as an embedding: the input is (nearly) one-hot, so lecun's
    # 1/sqrt(vocab_size) would start the decoder at activations of ~0.01, which the first
    # Adam steps on its biases already swamp (dead ReLUs at lr 1e-3).
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("conv_h", "conv_w", "conv_in", "conv_out")),
        (1, 1, self.vocab_size, self.width))
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("conv_out",)), (self.width,))
    if jnp.issubdtype(codes.dtype, jnp.integer):
      return jnp.take(kernel[0, 0], codes, axis=0) + bias
    return jnp.einsum("bhwk,kc->bhwc", codes.astype(jnp.float32), kernel[0, 0]) + bias


class Decoder(nn.Module):
  """Codes (relaxed one-hot [B, h, w, vocab_size] or int tokens [B, h, w]) -> float32
  logit-Laplace stats [B, h*f, w*f, 2 * channels] = (mu, log-scale)."""
  vocab_size: int = 8192
  hidden: int = 256
  init_width: int = 128
  blocks_per_group: int = 2
  downsample_factor: int = 8
  channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, codes: jax.Array) -> jax.Array:
    groups = num_groups(self.downsample_factor)
    gain = 1.0 / (groups * self.blocks_per_group) ** 2
    # float32 first layer, as in `dall_e`: the relaxed codes are soft over many entries.
    h = CodeInput(self.vocab_size, self.init_width, name="input")(codes).astype(self.dtype)
    for g in range(1, groups + 1):
      for b in range(1, self.blocks_per_group + 1):
        h = ResBlock(self.hidden * 2 ** (groups - g), (1, 3, 3, 3), gain, self.dtype,
                     name=f"group_{g}_block_{b}")(h)
      if g < groups:
        h = layers.upsample_nearest(h)
    # float32 output: the log-scale enters the loss through exp(-log b).
    h = nn.relu(h).astype(jnp.float32)
    return layers.conv(2 * self.channels, 1, jnp.float32, "output", padding=0)(h)


class DiscreteVAE(nn.Module):
  """Encoder + decoder; see the module docstring. Images are NHWC in [0, 1]."""
  vocab_size: int = 8192           # codebook size K (paper: 8192)
  hidden: int = 256                # width of the first encoder / last decoder group (n_hid)
  init_width: int = 128            # decoder width after its code input conv (n_init)
  blocks_per_group: int = 2        # residual blocks per group
  downsample_factor: int = 8       # f, a power of two: image side / code-grid side (paper: 8)
  channels: int = 3                # image channels
  dtype: Any = jnp.float32         # compute dtype (float32 | bfloat16); params stay float32

  def setup(self):
    check_fields(self.vocab_size, self.hidden, self.init_width, self.blocks_per_group,
                 self.downsample_factor, self.channels)
    common = dict(vocab_size=self.vocab_size, hidden=self.hidden,
                  blocks_per_group=self.blocks_per_group,
                  downsample_factor=self.downsample_factor, dtype=self.dtype)
    self.encoder = Encoder(**common)
    self.decoder = Decoder(init_width=self.init_width, channels=self.channels, **common)

  def _check_images(self, images: jax.Array) -> None:
    f = self.downsample_factor
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"images must be [B, H, W, {self.channels}], got shape {images.shape}")
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not divisible by "
                       f"the downsampling factor {f}")

  def encode_logits(self, images: jax.Array, return_features: bool = False
                    ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Images [B, H, W, C] in [0, 1] -> float32 code logits [B, H/f, W/f, K] (and the
    encoder's last features, with `return_features`)."""
    self._check_images(images)
    return self.encoder(map_pixels(images.astype(jnp.float32)).astype(self.dtype),
                        return_features)

  def encode(self, images: jax.Array) -> jax.Array:
    """Images in [0, 1] -> int32 tokens [B, H/f, W/f]: the most likely code (inference)."""
    return jnp.argmax(self.encode_logits(images), axis=-1).astype(jnp.int32)

  def decode_stats(self, codes: jax.Array) -> jax.Array:
    """Tokens [B, h, w] (int) or relaxed one-hot codes [B, h, w, K] -> float32 stats
    [B, h*f, w*f, 2C]."""
    return self.decoder(codes)

  def decode(self, tokens: jax.Array) -> jax.Array:
    """Tokens [B, h, w] -> images [B, h*f, w*f, C] in [0, 1]."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 3:
      raise ValueError(f"tokens must be int [B, h, w], got {tokens.dtype} {tokens.shape}")
    return stats_to_pixels(self.decoder(tokens))

  def __call__(self, images: jax.Array, rng: jax.Array | None = None,
               temperature: jax.Array | float = 1.0, return_features: bool = False
               ) -> tuple[jax.Array, ...]:
    """Images in [0, 1] -> (decoder stats, code logits[, encoder features]). With `rng` the
    decoder reads a gumbel-softmax sample at `temperature` (training); without, the argmax
    tokens."""
    logits, features = self.encode_logits(images, return_features=True)
    if rng is None:
      codes = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      codes = gumbel_softmax(rng, logits, temperature)
    stats = self.decoder(codes)
    return (stats, logits, features) if return_features else (stats, logits)


VARIANTS: dict[str, dict[str, Any]] = {
    # OpenAI's published dVAE (dall_e encoder.pkl / decoder.pkl): 256 px -> 32 x 32 tokens.
    "dall_e": {},
    # shapes-v1 at 64 px -> 16 x 16 tokens (configs/dvae_shapes.py).
    "shapes": {"vocab_size": 512, "hidden": 16, "init_width": 64, "blocks_per_group": 1,
               "downsample_factor": 4},
    # CPU-sized, for tests.
    "tiny": {"vocab_size": 64, "hidden": 16, "init_width": 16, "blocks_per_group": 1,
             "downsample_factor": 4},
}


def variant(name: str, **overrides: Any) -> DiscreteVAE:
  """A DiscreteVAE of a standard size ("dall_e", "shapes", "tiny"), fields overridden by
  keyword."""
  if name not in VARIANTS:
    raise ValueError(f"unknown dVAE variant {name!r}; choose one of {sorted(VARIANTS)}")
  return DiscreteVAE(**{**VARIANTS[name], **overrides})
