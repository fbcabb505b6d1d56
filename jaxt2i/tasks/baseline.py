"""Task: caption -> image regression (models/baseline.py) with an L2 loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxt2i.models.baseline import CaptionRegressor
from jaxt2i.tasks.base import Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError


@register
class CaptionRegressionTask(Task):
  name = "caption_regression"

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.width = 64            # token embedding width
    m.mlp_dim = 256         # MLP hidden width
    m.base_resolution = 8   # side of the feature map the MLP emits
    m.channels = 32         # conv decoder channels
    return m

  def validate(self) -> None:
    super().validate()
    m, size = self.config.model, self.config.data.image_size
    for field in ("width", "mlp_dim", "base_resolution", "channels"):
      if m[field] <= 0:
        raise ConfigError(f"config.model.{field}={m[field]}: must be positive")
    ratio = size // m.base_resolution
    if size % m.base_resolution or ratio & (ratio - 1):
      raise ConfigError(f"config.data.image_size={size} must be base_resolution "
                        f"({m.base_resolution}) times a power of two")

  @property
  def model(self) -> CaptionRegressor:
    m = self.config.model
    return CaptionRegressor(
        vocab_size=self.config.data.vocab_size, max_length=self.config.data.max_caption_length,
        image_size=self.config.data.image_size, width=m.width, mlp_dim=m.mlp_dim,
        base_resolution=m.base_resolution, channels=m.channels, dtype=self.compute_dtype)

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    return self.model.init(rng, batch["tokens"], batch["tokens_mask"])["params"]

  def predict(self, params: PyTree, batch: Batch) -> jax.Array:
    return self.model.apply({"params": params}, batch["tokens"], batch["tokens_mask"])

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng  # deterministic model
    mse = jnp.mean(jnp.square(self.predict(params, batch) - batch["image"]))
    return mse, {"mse": mse}

  def to_uint8(self, x: jax.Array) -> jax.Array:
    low, high = self.config.data.value_range
    return jnp.clip((x - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(jnp.uint8)

  def sample(self, params: PyTree, batch: Batch, rng: jax.Array) -> jax.Array:
    del rng  # one deterministic image per caption
    return self.to_uint8(self.predict(params, batch))

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    pred = self.predict(params, batch)
    # Predictions and the captions' real images, in the same order, for side-by-side grids.
    return {"mse": jnp.mean(jnp.square(pred - batch["image"])),
            "samples": self.to_uint8(pred[:8]), "reference": self.to_uint8(batch["image"][:8])}
