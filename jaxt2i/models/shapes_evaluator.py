"""The shapes-v1 evaluator network: a small CNN that reads the objects of a scene off an image.

shapes-v1 puts every object near the centre of one of the nine cells of a 3x3 grid, at most one
object per cell, so the network predicts, for each cell (an object slot), whether an object is
there, its colour, shape and size, and its centre as an offset from the cell centre. The
penultimate activations (`features`) are the feature space of the shapes-v1 Frechet distance,
KID and diversity, the way MNIST FIDs use a small MNIST classifier instead of Inception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxt2i.models import layers

NUM_CELLS = 9


class ShapesEvaluatorNet(nn.Module):
  num_colors: int
  num_shapes: int
  num_sizes: int
  channels: Sequence[int] = (32, 64, 128)  # per stage; each stage halves the resolution
  feature_dim: int = 256
  dtype: Any = jnp.float32

  @property
  def slot_width(self) -> int:
    """Outputs per cell: presence logit, colour / shape / size logits, (dx, dy) offset."""
    return 1 + self.num_colors + self.num_shapes + self.num_sizes + 2

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """images: float [B, H, W, 3] in [0, 1] -> per-cell predictions and features."""
    h = images.astype(self.dtype)
    # A 4x4 stride-2 stem sees every pixel once at a quarter of a full-resolution conv's cost.
    h = nn.relu(layers.conv(self.channels[0], 4, self.dtype, "stem", strides=2)(h))
    for i, width in enumerate(self.channels):
      if i:
        h = nn.relu(layers.conv(width, 3, self.dtype, f"down_{i}", strides=2)(h))
      h = nn.relu(layers.conv(width, 3, self.dtype, f"conv_{i}")(h))
      h = nn.GroupNorm(num_groups=8, dtype=self.dtype, name=f"norm_{i}",
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(h)
    # Flattening keeps where things are: the head must know which cell each feature came from.
    h = h.reshape(h.shape[0], -1)
    features = nn.relu(layers.dense(self.feature_dim, ("embed", "mlp"), self.dtype, "fc")(h))
    out = layers.dense(NUM_CELLS * self.slot_width, ("mlp", "embed"), self.dtype, "head")(features)
    out = out.astype(jnp.float32).reshape(-1, NUM_CELLS, self.slot_width)
    c, s = 1 + self.num_colors, 1 + self.num_colors + self.num_shapes
    z = s + self.num_sizes
    return {
        "present": out[..., 0],
        "color": out[..., 1:c],
        "shape": out[..., c:s],
        "size": out[..., s:z],
        "offset": out[..., z:],
        "features": features.astype(jnp.float32),
    }
