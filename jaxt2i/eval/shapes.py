"""The shapes-v1 score: does each image show what its caption names?

    images + captions -> evaluator network (per-cell objects) -> match to the caption's objects
      -> per image: colour / shape / size per object, place, count -> report

Implements "Scoring a generated image against its caption" of ../shared/specs/shapes-v1.md.
The evaluator (tasks/shapes_evaluator.py) is trained with the project's trainer on generated
scenes only, once per image size, and cached (see `evaluator_dir`); `score` trains it on
first use if it is missing.

Scoring rules fixed here where the spec leaves a choice:
  * Each named object is matched to one detected object; the matching maximises the number
    of right attributes (colour, shape, size), then the place. An object with no detection left
    counts as wrong in every attribute.
  * Place: one object: the cell nearest its detected centre is the named cell; two objects:
    centres at least 0.15 W apart along the relation's axis, in the named direction.
  * Extra objects do not make an image wrong (the spec asks that every named object be
    present); `count` (as many objects as named) is reported as its own attribute.
  * `per_attribute` colour / shape / size are accuracies over named objects; place and count
    over images.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from jaxt2i.data import shapes
from jaxt2i.data.pipeline import resize_center_crop
from jaxt2i.tasks.shapes_evaluator import (COLOR_NAMES, OFFSET_UNIT, SIZE_NAMES,
                                           ShapesEvaluatorTask, cell_of)

# Bump when the evaluator's recipe changes: cached evaluators of other versions are not used.
EVALUATOR_VERSION = 1
EVALUATOR_SIZES = (32, 64, 128)
RELATION_MIN_GAP = 0.15  # units of W
ATTRIBUTES = ("color", "shape", "size", "place", "count")


def evaluator_config(image_size: int = 64) -> ml_collections.ConfigDict:
  """The recipe of the shapes-v1 evaluator at `image_size` (configs/shapes_evaluator.py)."""
  from jaxt2i.training.config import trainer_defaults
  if image_size not in EVALUATOR_SIZES:
    raise ValueError(f"no shapes-v1 evaluator recipe for {image_size}px; sizes: "
                     f"{list(EVALUATOR_SIZES)} (other images are resized to the nearest)")
  c = trainer_defaults()
  c.task = ShapesEvaluatorTask.name
  c.model = ShapesEvaluatorTask.default_model_config()
  c.data.name = "shapes_v1/generated"
  c.data.image_size = image_size
  c.data.value_range = (0.0, 1.0)
  c.data.worker_count = 1      # scenes are rendered in a worker process, beside the step
  c.batch_size = 64
  c.seed = 0
  c.train.num_steps = {32: 1200, 64: 800, 128: 800}[image_size]
  c.train.log_every = 100
  c.train.eval_every = 0
  c.train.ema_decay = 0.0      # a classifier: the final weights are the ones to use
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 1
  return c


def cache_root() -> epath.Path:
  """$JAXT2I_CACHE_DIR, else ~/.cache/jaxt2i."""
  root = os.environ.get("JAXT2I_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "jaxt2i")
  return epath.Path(os.path.abspath(root))


def evaluator_dir(image_size: int = 64, cache_dir: str | None = None) -> epath.Path:
  """Where the evaluator for `image_size` lives: a trainer workdir plus `evaluator.json`."""
  root = epath.Path(os.path.abspath(cache_dir)) if cache_dir else cache_root()
  return root / "evaluators" / f"shapes_v1_{image_size}px_v{EVALUATOR_VERSION}"


# ---------------------------------------------------------------------------------------------
# Reading objects off predictions


@dataclasses.dataclass(frozen=True)
class Detection:
  color: str
  shape: str
  size: str
  x: float           # centre, units of W
  y: float
  confidence: float  # presence probability

  def to_json(self) -> dict[str, Any]:
    return {"color": self.color, "shape": self.shape, "size": self.size,
            "x": round(self.x, 4), "y": round(self.y, 4), "confidence": round(self.confidence, 4)}


def decode(pred: dict[str, np.ndarray], threshold: float = 0.5) -> list[list[Detection]]:
  """Per-cell network outputs (numpy) -> the objects of each image."""
  prob = 1.0 / (1.0 + np.exp(-np.asarray(pred["present"], np.float64)))
  color = np.argmax(pred["color"], -1)
  shape = np.argmax(pred["shape"], -1)
  size = np.argmax(pred["size"], -1)
  offset = np.asarray(pred["offset"], np.float64) * OFFSET_UNIT
  out = []
  for b in range(prob.shape[0]):
    found = []
    for cell in np.flatnonzero(prob[b] > threshold):
      row, col = divmod(int(cell), 3)
      found.append(Detection(
          COLOR_NAMES[color[b, cell]], shapes.SHAPES[shape[b, cell]], SIZE_NAMES[size[b, cell]],
          shapes.CELL_CENTRES[col] + offset[b, cell, 0],
          shapes.CELL_CENTRES[row] + offset[b, cell, 1], float(prob[b, cell])))
    out.append(found)
  return out


# ---------------------------------------------------------------------------------------------
# Matching an image's objects to its caption


def _place_ok(parsed: shapes.ParsedCaption, found: Sequence[Detection | None]) -> bool:
  if any(d is None for d in found):
    return False
  if parsed.position is not None:
    x, y = shapes.POSITIONS[parsed.position]
    return cell_of(found[0].x, found[0].y) == cell_of(x, y)
  a, b = found
  gap = {"to the left of": b.x - a.x, "to the right of": a.x - b.x,
         "above": b.y - a.y, "below": a.y - b.y}[parsed.relation]
  return gap >= RELATION_MIN_GAP


def judge(caption: str, detections: Sequence[Detection]) -> dict[str, Any]:
  """One image's verdict: which attributes are right, and whether it is fully correct."""
  parsed = shapes.parse_caption(caption)
  named = parsed.objects
  slots: list[Detection | None] = list(detections) + [None] * len(named)
  best = None
  for assigned in itertools.permutations(range(len(slots)), len(named)):
    found = [slots[i] for i in assigned]
    attrs = {name: [d is not None and getattr(d, name) == getattr(o, name)
                    for o, d in zip(named, found)] for name in ("color", "shape", "size")}
    place = _place_ok(parsed, found)
    key = (sum(sum(v) for v in attrs.values()), place)
    if best is None or key > best[0]:
      best = (key, attrs, place, found)
  _, attrs, place, found = best
  count = len(detections) == len(named)
  correct = place and all(all(v) for v in attrs.values())
  return {"caption": parsed.caption, "correct": bool(correct),
          "objects": {k: [bool(x) for x in v] for k, v in attrs.items()},
          "place": bool(place), "count": bool(count),
          "detected": [d.to_json() for d in detections]}


def summarize(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Fractions over a set of verdicts: `fully_correct` and `per_attribute`."""
  n = len(verdicts)
  if n == 0:
    return {"num_images": 0, "fully_correct": float("nan"),
            "per_attribute": {a: float("nan") for a in ATTRIBUTES}}
  per = {}
  for name in ("color", "shape", "size"):
    flags = [x for v in verdicts for x in v["objects"][name]]
    per[name] = float(np.mean(flags))
  per["place"] = float(np.mean([v["place"] for v in verdicts]))
  per["count"] = float(np.mean([v["count"] for v in verdicts]))
  return {"num_images": n, "fully_correct": float(np.mean([v["correct"] for v in verdicts])),
          "per_attribute": per}


# ---------------------------------------------------------------------------------------------
# The evaluator: training, caching, loading


class ShapesScorer:
  """A trained evaluator: per-cell predictions, features and scores for uint8 images."""

  def __init__(self, params, config: ml_collections.ConfigDict, directory: epath.Path | None = None,
               batch_size: int = 256):
    self.params, self.config, self.directory = params, config, directory
    self.image_size = int(config.data.image_size)
    self.task = ShapesEvaluatorTask(config)
    self.batch_size = batch_size
    self._apply = jax.jit(self.task.apply)

  def _prepare(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
      raise ValueError(f"expected uint8 images (0..255), got {images.dtype}; convert with "
                       "np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8) from [0, 1]")
    if images.shape[1:3] != (self.image_size, self.image_size):
      images = np.stack([resize_center_crop(im, self.image_size) for im in images])
    return images

  def predict(self, images) -> dict[str, np.ndarray]:
    """uint8 [N, H, W, 3] (resized to the evaluator's size if needed) -> per-cell outputs and
    `features` [N, feature_dim], as numpy."""
    images = self._prepare(images)
    n = images.shape[0]
    # Batches padded to a power of two (at most batch_size): few distinct compilations.
    size = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
    outs = []
    for start in range(0, n, size):
      chunk = images[start:start + size]
      pad = size - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out = self._apply(self.params, chunk.astype(np.float32) / 255.0)
      outs.append({k: np.asarray(v)[:chunk.shape[0] - pad] for k, v in out.items()})
    if not outs:
      return {}
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def features(self, images) -> np.ndarray:
    return self.predict(images)["features"].astype(np.float64)

  def judge(self, images, captions: Sequence[str]) -> list[dict[str, Any]]:
    captions = [c.decode() if isinstance(c, bytes) else c for c in captions]
    if len(captions) != len(images):
      raise ValueError(f"{len(images)} images but {len(captions)} captions; give one caption "
                       "per image, in the same order")
    for i, caption in enumerate(captions):
      try:
        shapes.parse_caption(caption)
      except ValueError as e:
        raise ValueError(f"caption {i}: {e}") from None
    pred = self.predict(images)
    return [judge(c, d) for c, d in zip(captions, decode(pred))]

  def score(self, images, captions: Sequence[str], *, include_images: bool = False
            ) -> dict[str, Any]:
    """uint8 images [N, H, W, 3] and their captions -> {fully_correct, per_attribute, ...}."""
    verdicts = self.judge(images, captions)
    report = summarize(verdicts)
    if include_images:
      report["images"] = verdicts
    return report


def _abstract_params(config: ml_collections.ConfigDict):
  from jaxt2i.parallel import partitioning
  task = ShapesEvaluatorTask(config)
  size = config.data.image_size
  dummy = {"image": jax.ShapeDtypeStruct((1, size, size, 3), np.float32)}
  return partitioning.unbox(jax.eval_shape(task.init, jax.random.key(0), dummy))


def train_evaluator(image_size: int = 64, cache_dir: str | None = None, *, force: bool = False,
                    config: ml_collections.ConfigDict | None = None,
                    calibration_images: int = 1000) -> epath.Path:
  """Trains (or resumes, or finds) the evaluator for `image_size`; returns its directory.

  The run is an ordinary trainer workdir (interrupted training resumes); `evaluator.json` is
  written last with its calibration on the real `test` split, and marks it complete.
  """
  directory = evaluator_dir(image_size, cache_dir)
  marker = directory / "evaluator.json"
  if marker.exists() and not force:
    return directory
  # One trainer at a time per cache (parallel test workers, two jobs on one machine): the
  # others wait and then find the finished evaluator.
  import filelock
  directory.parent.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(str(directory) + ".lock"):
    if marker.exists() and not force:
      return directory
    return _train_evaluator(directory, image_size, force, config, calibration_images)


def _train_evaluator(directory: epath.Path, image_size: int, force: bool,
                     config: ml_collections.ConfigDict | None,
                     calibration_images: int) -> epath.Path:
  from jaxt2i.training.trainer import Trainer
  marker = directory / "evaluator.json"
  if force and directory.exists():
    directory.rmtree()
  config = config or evaluator_config(image_size)
  logging.info("training the shapes-v1 evaluator (%dpx) in %s", image_size, directory)
  trainer = Trainer(config, directory, devices=jax.local_devices()[:1])
  try:
    state = trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  step = int(jax.device_get(state.step))
  if step < config.train.num_steps:
    # Stopped by SIGTERM: no evaluator.json, so nothing scores with a half-trained evaluator.
    raise RuntimeError(f"the shapes-v1 evaluator's training in {directory} stopped at step "
                       f"{step} of {config.train.num_steps}; it resumes from there the next "
                       "time an evaluator is needed")
  scorer = ShapesScorer(jax.device_get(state.params), config, directory)
  calibration = {split: calibrate(scorer, split, calibration_images)
                 for split in ("test", "test_heldout")}
  info = {"version": EVALUATOR_VERSION, "image_size": image_size,
          "steps": int(config.train.num_steps), "calibration": calibration,
          "train_seconds": getattr(trainer, "loop_timing", {}).get("seconds")}
  marker.write_text(json.dumps(info, indent=2))
  logging.info("shapes-v1 evaluator %dpx ready: %s", image_size, json.dumps(calibration))
  return directory


def calibrate(scorer: ShapesScorer, split: str = "test", num_images: int = 1000
              ) -> dict[str, float]:
  """Fully-correct rate on real images of `split`, and on two corruptions that must fail:
  the two objects' colours swapped, and captions shuffled against the images."""
  records = [shapes.example(split, i, scorer.image_size) for i in range(num_images)]
  images = np.stack([r["image"] for r in records])
  captions = [r["caption"] for r in records]
  real = scorer.score(images, captions)
  two = [r for r in records if r["num_objects"] == 2]
  swapped = []
  for r in two:
    parsed = shapes.parse_caption(r["caption"])
    a, b = parsed.objects
    swapped.append(shapes.ParsedCaption(
        (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)),
        relation=parsed.relation).caption)
  swap = scorer.score(np.stack([r["image"] for r in two]), swapped)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(captions))
  shuffled = scorer.score(images, [captions[i] for i in order])
  return {"num_images": num_images, "fully_correct": real["fully_correct"],
          **{f"{k}_acc": v for k, v in real["per_attribute"].items()},
          "swapped_colors_fully_correct": swap["fully_correct"],
          "shuffled_captions_fully_correct": shuffled["fully_correct"]}


@functools.lru_cache(maxsize=8)
def _load_cached(directory: str) -> ShapesScorer:
  from jaxt2i.training.checkpoint import restore_params
  directory = epath.Path(directory)
  config = ml_collections.ConfigDict(json.loads((directory / "config.json").read_text()))
  params = restore_params(directory / "checkpoints", _abstract_params(config))
  return ShapesScorer(params, config, directory)


def load_evaluator(image_size: int = 64, cache_dir: str | None = None, *,
                   train_if_missing: bool = True) -> ShapesScorer:
  """The cached evaluator for `image_size` (32, 64 or 128), trained first if missing."""
  directory = evaluator_dir(image_size, cache_dir)
  if not (directory / "evaluator.json").exists():
    if not train_if_missing:
      raise FileNotFoundError(
          f"no shapes-v1 evaluator for {image_size}px in {directory}; train it with "
          f"`jaxt2i eval train-evaluator --image_size {image_size}` (a few minutes on a CPU)")
    train_evaluator(image_size, cache_dir)
  return _load_cached(str(directory))


def nearest_evaluator_size(image_size: int) -> int:
  return min(EVALUATOR_SIZES, key=lambda s: (abs(s - image_size), -s))


def score(images, captions: Sequence[str], *, evaluator: ShapesScorer | None = None,
          cache_dir: str | None = None, include_images: bool = False) -> dict[str, Any]:
  """The shapes-v1 report for uint8 images [N, H, W, 3] and one caption per image.

  Returns {"num_images", "fully_correct", "per_attribute": {color, shape, size, place, count}}
  (fractions), plus per-image verdicts with `include_images=True`.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
  if evaluator is None:
    evaluator = load_evaluator(nearest_evaluator_size(images.shape[1]), cache_dir)
  return evaluator.score(images, captions, include_images=include_images)
