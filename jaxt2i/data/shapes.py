"""shapes-v1: the built-in captioned-scenes benchmark, generated procedurally (pure numpy).

Implements ../shared/specs/shapes-v1.md exactly: palette, five shapes, two sizes, a 3x3 grid
of positions with jitter, one- and two-object scenes with spatial relations, held-out
colour-shape pairs for zero-shot composition, and 4x supersampled box-filtered rendering.
Every example is drawn from its own generator seeded by (split seed, index), so any example
can be produced alone, in any order, in parallel.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 170, 40), "blue": (40, 80, 230),
    "yellow": (240, 220, 40), "purple": (150, 50, 210), "orange": (250, 140, 20),
    "cyan": (40, 210, 220), "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.18, "large": 0.30}
_THIRDS = (1 / 6, 1 / 2, 5 / 6)
POSITIONS: dict[str, tuple[float, float]] = {
    "in the top left": (_THIRDS[0], _THIRDS[0]), "at the top": (_THIRDS[1], _THIRDS[0]),
    "in the top right": (_THIRDS[2], _THIRDS[0]), "on the left": (_THIRDS[0], _THIRDS[1]),
    "in the center": (_THIRDS[1], _THIRDS[1]), "on the right": (_THIRDS[2], _THIRDS[1]),
    "in the bottom left": (_THIRDS[0], _THIRDS[2]), "at the bottom": (_THIRDS[1], _THIRDS[2]),
    "in the bottom right": (_THIRDS[2], _THIRDS[2]),
}
_CELL_PHRASE = {(i // 3, i % 3): phrase for i, phrase in enumerate(POSITIONS)}  # (row, col)
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("white", "diamond"),
    ("green", "cross")})
SPLITS = ("train", "test", "test_heldout")
SPLIT_SEEDS: dict[str, int] = {"train": 1_000_001, "test": 2_000_003, "test_heldout": 3_000_007}
JITTER = 0.01        # centre jitter, units of W, uniform on each axis
SUPERSAMPLE = 4      # render at 4x, then average 4x4 blocks


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  color: str
  shape: str
  size: str
  row: int
  col: int
  x: float  # centre, units of W, jitter included
  y: float

  @property
  def heldout(self) -> bool:
    return (self.color, self.shape) in HELDOUT_PAIRS


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[ShapeObject, ...]
  position: str | None = None  # one object
  relation: str | None = None  # two objects

  @property
  def caption(self) -> str:
    first = self.objects[0]
    if len(self.objects) == 1:
      return f"a {first.size} {first.color} {first.shape} {self.position}"
    second = self.objects[1]
    return (f"a {first.size} {first.color} {first.shape} {self.relation} "
            f"a {second.size} {second.color} {second.shape}")


@dataclasses.dataclass(frozen=True)
class ParsedObject:
  size: str
  color: str
  shape: str


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
  objects: tuple[ParsedObject, ...]
  position: str | None = None
  relation: str | None = None


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown shapes-v1 split {split!r}; choose one of {list(SPLITS)}")


def relation_of(a: ShapeObject, b: ShapeObject) -> str:
  if a.row == b.row:
    return "to the left of" if a.col < b.col else "to the right of"
  return "above" if a.row < b.row else "below"


def _draw_object(rng: np.random.Generator, color: str, row: int, col: int) -> ShapeObject:
  shape = SHAPES[rng.integers(len(SHAPES))]
  size = tuple(SIZES)[rng.integers(len(SIZES))]
  jx, jy = rng.uniform(-JITTER, JITTER, size=2)
  return ShapeObject(color, shape, size, row, col, _THIRDS[col] + float(jx),
                     _THIRDS[row] + float(jy))


def _draw_scene(rng: np.random.Generator) -> Scene:
  names = tuple(COLORS)
  if rng.random() < 0.5:
    cell = int(rng.integers(9))
    obj = _draw_object(rng, names[rng.integers(len(names))], cell // 3, cell % 3)
    return Scene((obj,), position=_CELL_PHRASE[(obj.row, obj.col)])
  # Independent uniform draws, rejected until the rules hold: the conditional distribution
  # is uniform over valid (colour pair, cell pair) combinations, as the spec asks.
  while True:
    ca, cb = rng.integers(len(names), size=2)
    a_cell, b_cell = rng.integers(9, size=2)
    (ar, ac), (br, bc) = divmod(int(a_cell), 3), divmod(int(b_cell), 3)
    if ca != cb and a_cell != b_cell and (ar == br or ac == bc):
      break
  a = _draw_object(rng, names[ca], ar, ac)
  b = _draw_object(rng, names[cb], br, bc)
  return Scene((a, b), relation=relation_of(a, b))


def sample_scene(rng: np.random.Generator, split: str) -> Scene:
  """A scene of `split`'s distribution: the full one, conditioned by rejection on the split's
  held-out rule (none held out in train, at least one in test_heldout)."""
  _check_split(split)
  while True:
    scene = _draw_scene(rng)
    heldout = any(o.heldout for o in scene.objects)
    if split == "train" and heldout or split == "test_heldout" and not heldout:
      continue
    return scene


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
  h = s / 2
  if shape == "square":
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if shape == "circle":
    return dx * dx + dy * dy <= h * h
  if shape == "triangle":
    # Apex at (0, -h), base at y = +h from -h to +h: the half-width grows as (y + h) / 2.
    return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= h
  if shape == "cross":
    t = s / 6  # half the bar thickness s/3
    return (((np.abs(dx) <= h) & (np.abs(dy) <= t)) | ((np.abs(dx) <= t) & (np.abs(dy) <= h)))
  raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
  """The scene as a (W, W, 3) uint8 image: 4x supersampled, box-filtered, rounded."""
  if not isinstance(image_size, (int, np.integer)) or image_size < 8:
    raise ValueError(f"image_size={image_size!r}: must be an integer >= 8")
  w, n = int(image_size), int(image_size) * SUPERSAMPLE
  canvas = np.zeros((n, n, 3), np.float32)
  box = [n, n, 0, 0]  # union of the objects' windows: the only blocks that are not black
  for obj in scene.objects:
    s = SIZES[obj.size] * w
    cx, cy = obj.x * w, obj.y * w
    # Only the samples inside the object's bounding square can be covered.
    lo_x = max(int(np.floor((cx - s / 2) * SUPERSAMPLE)) - 1, 0)
    hi_x = min(int(np.ceil((cx + s / 2) * SUPERSAMPLE)) + 1, n)
    lo_y = max(int(np.floor((cy - s / 2) * SUPERSAMPLE)) - 1, 0)
    hi_y = min(int(np.ceil((cy + s / 2) * SUPERSAMPLE)) + 1, n)
    # Sample points at the centres of the supersampled pixels, in canvas pixel units.
    xs = (np.arange(lo_x, hi_x) + 0.5) / SUPERSAMPLE - cx
    ys = (np.arange(lo_y, hi_y) + 0.5) / SUPERSAMPLE - cy
    mask = _coverage(obj.shape, xs[None, :], ys[:, None], s)
    canvas[lo_y:hi_y, lo_x:hi_x][mask] = COLORS[obj.color]  # later objects on top
    box = [min(box[0], lo_y), min(box[1], lo_x), max(box[2], hi_y), max(box[3], hi_x)]
  image = np.zeros((w, w, 3), np.uint8)
  r0, c0 = box[0] // SUPERSAMPLE, box[1] // SUPERSAMPLE
  r1, c1 = -(-box[2] // SUPERSAMPLE), -(-box[3] // SUPERSAMPLE)
  if r1 > r0 and c1 > c0:
    patch = canvas[r0 * SUPERSAMPLE:r1 * SUPERSAMPLE, c0 * SUPERSAMPLE:c1 * SUPERSAMPLE]
    patch = patch.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image[r0:r1, c0:c1] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
  return image


def record(scene: Scene, image_size: int = 64) -> dict:
  """The stored form of a scene (the tfds features of shapes_v1)."""
  return {
      "image": render(scene, image_size),
      "caption": scene.caption,
      "num_objects": len(scene.objects),
      "objects": {"color": [o.color for o in scene.objects],
                  "shape": [o.shape for o in scene.objects],
                  "size": [o.size for o in scene.objects],
                  "x": [o.x for o in scene.objects], "y": [o.y for o in scene.objects]},
      "position": scene.position or "",
      "relation": scene.relation or "",
  }


def example(split: str, index: int, image_size: int = 64, seed: int | None = None) -> dict:
  _check_split(split)
  if index < 0:
    raise ValueError(f"index={index}: must be >= 0")
  rng = np.random.default_rng((SPLIT_SEEDS[split] if seed is None else seed, index))
  return record(sample_scene(rng, split), image_size)


def generate(split: str, num_examples: int, image_size: int = 64, seed: int | None = None,
             start: int = 0) -> Iterator[dict]:
  _check_split(split)
  if num_examples < 0:
    raise ValueError(f"num_examples={num_examples}: must be >= 0")
  for index in range(start, start + num_examples):
    yield example(split, index, image_size, seed)


_WORD = r"([a-z]+)"
_OBJECT = rf"a {_WORD} {_WORD} {_WORD}"


def _parse_object(size: str, color: str, shape: str, caption: str) -> ParsedObject:
  for value, known, what in ((size, SIZES, "size"), (color, COLORS, "colour"),
                             (shape, SHAPES, "shape")):
    if value not in known:
      raise ValueError(f"unknown {what} {value!r} in caption {caption!r}; known: {list(known)}")
  return ParsedObject(size, color, shape)


def parse_caption(caption: str) -> ParsedCaption:
  """The objects and the position or relation a shapes-v1 caption names."""
  text = " ".join(caption.strip().lower().split())
  for phrase in POSITIONS:
    m = re.fullmatch(rf"{_OBJECT} {phrase}", text)
    if m:
      return ParsedCaption((_parse_object(*m.groups(), caption),), position=phrase)
  for relation in RELATIONS:
    m = re.fullmatch(rf"{_OBJECT} {relation} {_OBJECT}", text)
    if m:
      g = m.groups()
      return ParsedCaption((_parse_object(*g[:3], caption), _parse_object(*g[3:], caption)),
                           relation=relation)
  raise ValueError(f"caption {caption!r} is not in the shapes-v1 grammar: expected 'a SIZE "
                   "COLOUR SHAPE POSITION' or 'a SIZE COLOUR SHAPE RELATION a SIZE COLOUR SHAPE'")
