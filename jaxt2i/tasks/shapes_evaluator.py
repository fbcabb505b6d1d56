"""Task: the shapes-v1 evaluator (models/shapes_evaluator.py), trained on generated scenes.

Its data never comes from a generative model: every training image is rendered on the fly by
the shapes-v1 generator (jaxt2i.data.shapes), with labels read off the scene. The training
scenes are wider than the benchmark's (zero to three objects, any colour-shape pair, any
cells, larger centre jitter), so that the evaluator stays calibrated on the imperfect images
generative models make, and knows the held-out pairs that the `train` split never shows.
Evaluation runs on the real `test` split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxt2i.data import shapes
from jaxt2i.models.shapes_evaluator import NUM_CELLS, ShapesEvaluatorNet
from jaxt2i.tasks.base import Batch, PyTree, Task, register
from jaxt2i.training.config import ConfigError

COLOR_NAMES = tuple(shapes.COLORS)
SIZE_NAMES = tuple(shapes.SIZES)
# Offsets from the cell centre are predicted in units of half a cell (1/6 W).
OFFSET_UNIT = 1.0 / 6.0
TARGET_KEYS = ("present", "color", "shape", "size", "offset")
# Training scenes: probability of 0, 1, 2, 3 objects.
OBJECT_COUNT_PROBS = (0.04, 0.38, 0.38, 0.20)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def cell_of(x: float, y: float) -> int:
  """The grid cell (3 row + col) whose centre is nearest to (x, y), in units of W."""
  col = min(max(int(np.floor(x * 3)), 0), 2)
  row = min(max(int(np.floor(y * 3)), 0), 2)
  return 3 * row + col


def record_targets(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Per-cell labels of a shapes record (its `objects`), as the evaluator predicts them."""
  present = np.zeros(NUM_CELLS, np.float32)
  color = np.zeros(NUM_CELLS, np.int32)
  shape = np.zeros(NUM_CELLS, np.int32)
  size = np.zeros(NUM_CELLS, np.int32)
  offset = np.zeros((NUM_CELLS, 2), np.float32)
  objects = record["objects"]
  for c, s, z, x, y in zip(objects["color"], objects["shape"], objects["size"], objects["x"],
                           objects["y"]):
    x, y = float(x), float(y)
    cell = cell_of(x, y)
    present[cell] = 1.0
    color[cell] = COLOR_NAMES.index(_text(c))
    shape[cell] = shapes.SHAPES.index(_text(s))
    size[cell] = SIZE_NAMES.index(_text(z))
    row, col = divmod(cell, 3)
    offset[cell] = ((x - shapes.CELL_CENTRES[col]) / OFFSET_UNIT,
                    (y - shapes.CELL_CENTRES[row]) / OFFSET_UNIT)
  return {"present": present, "color": color, "shape": shape, "size": size, "offset": offset}


def training_scene(rng: np.random.Generator, max_offset: float) -> shapes.Scene:
  """A scene from the evaluator's training distribution (wider than shapes-v1's)."""
  n = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS))
  cells = rng.permutation(NUM_CELLS)[:n]
  colors = rng.permutation(len(COLOR_NAMES))[:n]  # distinct: same-colour neighbours would merge
  objects = []
  for cell, color in zip(cells.tolist(), colors.tolist()):
    row, col = divmod(cell, 3)
    dx, dy = rng.uniform(-max_offset, max_offset, size=2)
    objects.append(shapes.ShapeObject(
        COLOR_NAMES[color], shapes.SHAPES[int(rng.integers(len(shapes.SHAPES)))],
        SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))], row, col,
        shapes.CELL_CENTRES[col] + dx, shapes.CELL_CENTRES[row] + dy))
  return shapes.Scene(tuple(objects))


def _scene_record(scene: shapes.Scene, image_size: int) -> dict[str, Any]:
  objects = scene.objects
  return {
      "image": shapes.render(scene, image_size),
      "caption": "",
      "objects": {"color": [o.color for o in objects], "shape": [o.shape for o in objects],
                  "size": [o.size for o in objects], "x": [o.x for o in objects],
                  "y": [o.y for o in objects]},
  }


class GeneratedScenes:
  """A grain source of `num_records` scenes rendered on demand (a few thousand per second).

  kind 'evaluator': the evaluator's training distribution from its own seed; a shapes-v1
  split name: that split's records (`shapes.example(split, i)`), identical to the tfds build.
  """

  def __init__(self, kind: str, image_size: int, num_records: int, seed: int = 0,
               max_offset: float = 0.05):
    if kind != "evaluator" and kind not in shapes.SPLITS:
      raise ValueError(f"unknown scene kind {kind!r}; choose 'evaluator' or one of "
                       f"{list(shapes.SPLITS)}")
    self.kind, self.image_size, self.num_records = kind, image_size, num_records
    self.seed, self.max_offset = seed, max_offset

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if self.kind == "evaluator":
      rng = np.random.default_rng((self.seed, index))
      return _scene_record(training_scene(rng, self.max_offset), self.image_size)
    return shapes.example(self.kind, index, self.image_size)

  def __repr__(self) -> str:  # grain checks it on restore: short and stable
    return (f"GeneratedScenes({self.kind!r}, {self.image_size}px, {self.num_records}, "
            f"seed={self.seed}, max_offset={self.max_offset})")


def evaluator_loss(pred: Mapping[str, jax.Array], batch: Batch) -> tuple[jax.Array, dict]:
  """Presence BCE + attribute cross-entropies and offset L2 on the occupied cells."""
  present = batch["present"]
  occupied = jnp.maximum(present.sum(), 1.0)
  bce = optax.sigmoid_binary_cross_entropy(pred["present"], present).mean()

  def ce(name):
    per_cell = optax.softmax_cross_entropy_with_integer_labels(pred[name], batch[name])
    return (per_cell * present).sum() / occupied

  offset = (jnp.square(pred["offset"] - batch["offset"]).sum(-1) * present).sum() / occupied
  terms = {"presence": bce, "color": ce("color"), "shape": ce("shape"), "size": ce("size"),
           "offset": offset}
  return sum(terms.values()), terms


def cell_accuracies(pred: Mapping[str, jax.Array], batch: Batch) -> dict[str, jax.Array]:
  """Per-cell accuracies: presence over all cells, attributes over the occupied ones, and the
  fraction of images whose every cell is read right (a proxy of the full shapes-v1 score)."""
  present = batch["present"] > 0.5
  occupied = jnp.maximum(present.sum(), 1)
  presence_ok = (pred["present"] > 0) == present
  cell_ok = presence_ok
  out = {"presence_acc": presence_ok.mean()}
  for name in ("color", "shape", "size"):
    ok = jnp.argmax(pred[name], -1) == batch[name]
    out[f"{name}_acc"] = (ok & present).sum() / occupied
    cell_ok &= ok | ~present
  out["image_acc"] = cell_ok.all(-1).mean()
  err = jnp.abs(pred["offset"] - batch["offset"]).max(-1) * OFFSET_UNIT
  out["offset_max_err"] = jnp.where(present, err, 0.0).max()
  return out


@register
class ShapesEvaluatorTask(Task):
  name = "shapes_evaluator"
  batch_keys = ("image",) + TARGET_KEYS
  uses_text = False
  record_features = staticmethod(record_targets)

  @classmethod
  def default_model_config(cls) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.channels = (32, 64, 128)   # CNN stage widths (each stage halves the resolution)
    m.feature_dim = 256          # penultimate width: the Frechet-distance feature space
    m.max_offset = 0.05          # training scenes' centre jitter, units of W (shapes-v1: 0.01)
    m.num_train_records = 10_000_000  # generated on demand; an epoch never ends in practice
    m.num_eval_records = 512     # real `test` images for the periodic eval
    m.data_seed = 7              # seed of the training scenes (distinct from every split's)
    m.noise_std = 0.03           # Gaussian pixel noise during training, in [0, 1] units
    return m

  def validate(self) -> None:
    super().validate()
    m, size = self.config.model, self.config.data.image_size
    stages = len(m.channels)
    if any(c <= 0 or c % 8 for c in m.channels):
      raise ConfigError(f"config.model.channels={tuple(m.channels)}: each must be a positive "
                        "multiple of 8 (GroupNorm with 8 groups)")
    if size % (2 ** stages):
      raise ConfigError(f"config.data.image_size={size} must be divisible by 2^{stages} (one "
                        "halving per entry of config.model.channels)")
    if tuple(self.config.data.value_range) != (0.0, 1.0):
      raise ConfigError("the shapes evaluator reads pixels in [0, 1]: set "
                        "config.data.value_range=(0.0, 1.0)")

  @property
  def model(self) -> ShapesEvaluatorNet:
    m = self.config.model
    return ShapesEvaluatorNet(
        num_colors=len(COLOR_NAMES), num_shapes=len(shapes.SHAPES), num_sizes=len(SIZE_NAMES),
        channels=tuple(m.channels), feature_dim=m.feature_dim, dtype=self.compute_dtype)

  def data_source(self, split: str):
    m, size = self.config.model, self.config.data.image_size
    if split == "train":
      return GeneratedScenes("evaluator", size, m.num_train_records, m.data_seed, m.max_offset)
    return GeneratedScenes(split, size, m.num_eval_records)

  def init(self, rng: jax.Array, batch: Batch) -> PyTree:
    return self.model.init(rng, batch["image"])["params"]

  def apply(self, params: PyTree, images: jax.Array) -> dict[str, jax.Array]:
    return self.model.apply({"params": params}, images)

  def loss(self, params: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict]:
    images = batch["image"]
    if self.config.model.noise_std > 0:
      images = images + self.config.model.noise_std * jax.random.normal(rng, images.shape)
    pred = self.apply(params, images)
    loss, terms = evaluator_loss(pred, batch)
    return loss, {**terms, **cell_accuracies(pred, batch)}

  def evaluate(self, params: PyTree, batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    del rng
    pred = self.apply(params, batch["image"])
    return {**cell_accuracies(pred, batch), "loss": evaluator_loss(pred, batch)[0]}
