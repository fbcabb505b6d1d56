"""Task: CLIP (Radford et al. 2021), a contrastive image-text model (models/clip.py).

    images, captions of a batch of B pairs -> unit embeddings I, T [B, D]
    logits = scale * I @ T^T                                     [B, B]
    loss = (CE(logits, diag) + CE(logits^T, diag)) / 2           (CLIP, Fig. 3)

Each image must pick its caption out of the batch's B captions and each caption its image, so
the other B - 1 pairs are the negatives: the larger the batch, the harder (and better) the task.
A trained run scores image-caption agreement for the DALL-E pipeline's reranking (Ramesh et al.
2021, Sec. 2.5) and for the CLIP score (jaxt2i/eval/clip_score.py), through `embed_images`,
`embed_text` and `score`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxt2i.models.clip import CLIP, MAX_LOGIT_SCALE
from jaxt2i.tasks.base import Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError


def contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array,
                     logit_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE over all pairs: (scalar loss, logits [B, B], row i = image i).

  Under jit the batch is one global array sharded over the batch axes, so this matmul is
  already the similarity of every image to every caption of the *global* batch: XLA gathers
  the (small, [B, D]) embeddings across devices, and every device's pairs see every other
  device's as negatives, with no explicit all-gather as in CLIP's multi-GPU code.
  """
  logits = logit_scale * jnp.einsum("id,jd->ij", image_embeddings.astype(jnp.float32),
                                    text_embeddings.astype(jnp.float32))
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return (image_to_text + text_to_image) / 2, logits


def same_caption(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """bool [B, B]: whether captions i and j are the same token sequence."""
  valid = mask.astype(bool)
  tokens = jnp.where(valid, tokens, -1)
  return (tokens[:, None] == tokens[None]).all(-1)


def retrieval_accuracy(logits: jax.Array, tokens: jax.Array, mask: jax.Array
                       ) -> dict[str, jax.Array]:
  """In-batch top-1 retrieval both ways (chance: about 1 / B).

  A retrieved caption identical to the right one counts as right (and an image whose caption
  is identical to the query's): a batch of shapes-v1 scenes can hold the same caption twice,
  and nothing in the caption tells the two images apart.
  """
  same = same_caption(tokens, mask)
  rows = jnp.arange(logits.shape[0])
  best_text = jnp.argmax(logits, axis=1)    # for each image
  best_image = jnp.argmax(logits, axis=0)   # for each caption
  return {"image_to_text_acc": same[rows, best_text].astype(jnp.float32).mean(),
          "text_to_image_acc": same[best_image, rows].astype(jnp.float32).mean()}


@register
class CLIPTask(Task):
  name = "clip"

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.embed_dim = 128                   # joint embedding width
    m.image_channels = (32, 64, 128)    # conv stage widths, multiples of 8; each halves the size
    m.image_width = 256                 # image features before the projection
    m.text_width = 128                  # text encoder width
    m.text_depth = 2                    # text encoder blocks
    m.text_heads = 4                    # text encoder attention heads (must divide text_width)
    m.text_mlp_ratio = 4                # text encoder MLP width / text_width
    m.attention_implementation = "auto"  # auto | einsum | xla | cudnn
    m.init_temperature = 0.07           # softmax temperature at init: logit scale 1/0.07
    m.max_logit_scale = MAX_LOGIT_SCALE  # cap of the learned logit scale (CLIP: 100)
    return m

  def validate(self) -> None:
    super().validate()
    m, size = self.config.model, self.config.data.image_size
    for field in ("embed_dim", "image_width", "text_width", "text_depth", "text_heads",
                  "text_mlp_ratio"):
      if not isinstance(m[field], int) or m[field] <= 0:
        raise ConfigError(f"config.model.{field}={m[field]!r}: must be a positive integer")
    if not m.image_channels or any(c <= 0 or c % 8 for c in m.image_channels):
      raise ConfigError(f"config.model.image_channels={tuple(m.image_channels)}: each must be a "
                        "positive multiple of 8 (GroupNorm with 8 groups)")
    stages = len(m.image_channels)
    if size % (2 ** stages):
      raise ConfigError(f"config.data.image_size={size} must be divisible by 2^{stages} (one "
                        "halving per entry of config.model.image_channels)")
    if m.text_width % m.text_heads:
      raise ConfigError(f"config.model.text_width={m.text_width} is not divisible by "
                        f"config.model.text_heads={m.text_heads}")
    if not 0 < m.init_temperature:
      raise ConfigError(f"config.model.init_temperature={m.init_temperature}: must be > 0")
    if not 0 < m.max_logit_scale:
      raise ConfigError(f"config.model.max_logit_scale={m.max_logit_scale}: must be > 0")
    if self.config.train.grad_accum_steps != 1:
      # Micro-batches would each contrast against only their own pairs: a different (weaker)
      # objective than the configured batch, not the same gradient in pieces.
      raise ConfigError(f"config.train.grad_accum_steps={self.config.train.grad_accum_steps}: "
                        "the contrastive loss needs the whole batch at once; use 1")

  @property
  def model(self) -> CLIP:
    m = self.config.model
    return CLIP(vocab_size=self.config.data.vocab_size,
                max_length=self.config.data.max_caption_length, embed_dim=m.embed_dim,
                image_channels=tuple(m.image_channels), image_width=m.image_width,
                text_width=m.text_width, text_depth=m.text_depth, text_heads=m.text_heads,
                text_mlp_ratio=m.text_mlp_ratio,
                attention_implementation=m.attention_implementation,
                init_logit_scale=math.log(1.0 / m.init_temperature),
                max_logit_scale=m.max_logit_scale, dtype=self.compute_dtype)

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    size = self.config.data.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return self.model.init(rng, images, batch["tokens"][:1], batch["tokens_mask"][:1])["params"]

  # -- embeddings (reranking, CLIP score) ------------------------------------------------------

  def preprocess_images(self, images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float images already in config.data.value_range -> float images at
    the trained size (square images of another size are resized, bicubic with antialiasing)."""
    size = self.config.data.image_size
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
      raise ValueError(f"images must be square [N, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
      low, high = self.config.data.value_range
      images = images.astype(jnp.float32) / 255.0 * (high - low) + low
    images = images.astype(jnp.float32)
    if images.shape[1] != size:
      images = jax.image.resize(images, (images.shape[0], size, size, 3), "bicubic",
                                antialias=True)
    return images

  def embed_images(self, params: PyTree, images: jax.Array) -> jax.Array:
    """Unit embeddings [N, D] of images (see `preprocess_images`); jit-able."""
    return self.model.apply({"params": params}, self.preprocess_images(images),
                            method="encode_image")

  def embed_text(self, params: PyTree, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Unit embeddings [N, D] of tokenized captions [N, L]; jit-able."""
    return self.model.apply({"params": params}, tokens, mask, method="encode_text")

  def score(self, params: PyTree, images: jax.Array, tokens: jax.Array, mask: jax.Array
            ) -> jax.Array:
    """Cosine similarity [N] of image i with caption i, in [-1, 1]; jit-able."""
    if images.shape[0] != tokens.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} captions: score pairs "
                       "them one to one")
    return jnp.sum(self.embed_images(params, images) * self.embed_text(params, tokens, mask),
                   axis=-1)

  # -- training --------------------------------------------------------------------------------

  def _forward(self, params: PyTree, batch: Batch) -> tuple[jax.Array, dict]:
    image_emb, text_emb, scale = self.model.apply(
        {"params": params}, batch["image"], batch["tokens"], batch["tokens_mask"])
    loss, logits = contrastive_loss(image_emb, text_emb, scale)
    metrics = retrieval_accuracy(logits, batch["tokens"], batch["tokens_mask"])
    return loss, {"logit_scale": scale, **metrics, "_logits": logits}

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng  # deterministic: no dropout, no augmentation
    loss, metrics = self._forward(params, batch)
    metrics.pop("_logits")
    return loss, metrics

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    """Loss and retrieval accuracy on an eval batch, and the mean cosine of its matching and
    of its mismatched pairs (how far apart the model holds them)."""
    del rng
    loss, metrics = self._forward(params, batch)
    cosine = metrics.pop("_logits") / metrics["logit_scale"]
    same = same_caption(batch["tokens"], batch["tokens_mask"])
    mismatched = jnp.maximum((~same).sum(), 1)
    return {"loss": loss, **metrics, "positive_cosine": jnp.mean(jnp.diagonal(cosine)),
            "negative_cosine": jnp.where(same, 0.0, cosine).sum() / mismatched}
