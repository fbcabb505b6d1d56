"""shapes-v1: the built-in captioned-scenes benchmark, generated procedurally in pure numpy.

Implements ../shared/specs/shapes-v1.md: the palette, five shapes, two sizes, a 3x3 grid of
positions with jitter, one- and two-object scenes with spatial relations, held-out colour-shape
pairs for zero-shot composition, 4x supersampled box-filtered rendering, and a parser for the
caption grammar (used to score generated images against their prompts).

Example i of a split is drawn from its own generator, seeded by (split seed, i), so any example
can be produced alone, in any order, or in parallel, and `example(split, i)` is the record that
a tfds build stores at index i.

Where the spec leaves a choice open, this module fixes it as follows:
  * Splits keep the 50/50 one/two-object ratio: the object count is drawn first, then the
    objects are drawn by rejection until the scene and split rules hold (see `sample_scene`).
  * "Round to uint8" rounds halves up: a pixel is (sum of its 16 sample values + 8) // 16,
    computed in integers, so the result does not depend on float rounding modes.
  * Shapes are closed sets: a sample point exactly on an edge is covered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.18, "large": 0.30}  # side of the bounding square, units of W
CELL_CENTRES: tuple[float, ...] = (1 / 6, 1 / 2, 5 / 6)  # per grid column (x) and row (y)
POSITIONS: dict[str, tuple[float, float]] = {  # phrase -> (x, y), row-major: index = 3 row + col
    "in the top left": (CELL_CENTRES[0], CELL_CENTRES[0]),
    "at the top": (CELL_CENTRES[1], CELL_CENTRES[0]),
    "in the top right": (CELL_CENTRES[2], CELL_CENTRES[0]),
    "on the left": (CELL_CENTRES[0], CELL_CENTRES[1]),
    "in the center": (CELL_CENTRES[1], CELL_CENTRES[1]),
    "on the right": (CELL_CENTRES[2], CELL_CENTRES[1]),
    "in the bottom left": (CELL_CENTRES[0], CELL_CENTRES[2]),
    "at the bottom": (CELL_CENTRES[1], CELL_CENTRES[2]),
    "in the bottom right": (CELL_CENTRES[2], CELL_CENTRES[2]),
}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("white", "diamond"),
    ("green", "cross"),
})
SPLITS = ("train", "test", "test_heldout")
SPLIT_SEEDS: dict[str, int] = {"train": 1_000_001, "test": 2_000_003, "test_heldout": 3_000_007}
JITTER = 0.01     # half-width of the uniform centre jitter on each axis, units of W
SUPERSAMPLE = 4   # samples per pixel along each axis

_COLOR_NAMES = tuple(COLORS)
_SIZE_NAMES = tuple(SIZES)
_PHRASES = tuple(POSITIONS)
_RGB = {name: np.array(rgb, np.int32) for name, rgb in COLORS.items()}
_HELDOUT = [[(c, s) in HELDOUT_PAIRS for s in SHAPES] for c in _COLOR_NAMES]
# Upper bounds of one object's integer draws: colour, shape, size, cell (3 row + col).
_DRAW_HIGHS = {n: np.array([len(COLORS), len(SHAPES), len(SIZES), 9] * n) for n in (1, 2)}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  color: str
  shape: str
  size: str
  row: int  # grid cell, 0..2 from the top
  col: int  # grid cell, 0..2 from the left
  x: float  # centre, units of W, jitter included
  y: float

  @property
  def heldout(self) -> bool:
    return (self.color, self.shape) in HELDOUT_PAIRS


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[ShapeObject, ...]  # drawn in order: later objects on top
  position: str | None = None       # one object: its cell's phrase
  relation: str | None = None       # two objects: how A relates to B

  @property
  def caption(self) -> str:
    return _caption(self.objects, self.position, self.relation)

  @property
  def heldout(self) -> bool:
    return any(o.heldout for o in self.objects)


@dataclasses.dataclass(frozen=True)
class ParsedObject:
  color: str
  shape: str
  size: str


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
  objects: tuple[ParsedObject, ...]
  position: str | None = None
  relation: str | None = None

  @property
  def caption(self) -> str:
    return _caption(self.objects, self.position, self.relation)


def _caption(objects, position, relation) -> str:
  a = objects[0]
  if len(objects) == 1:
    return f"a {a.size} {a.color} {a.shape} {position}"
  b = objects[1]
  return f"a {a.size} {a.color} {a.shape} {relation} a {b.size} {b.color} {b.shape}"


def position_phrase(row: int, col: int) -> str:
  return _PHRASES[3 * row + col]


def relation_of(a: ShapeObject, b: ShapeObject) -> str:
  """The relation of A to B, from their cells (which share a row or a column)."""
  if a.row == b.row and a.col != b.col:
    return "to the left of" if a.col < b.col else "to the right of"
  if a.col == b.col and a.row != b.row:
    return "above" if a.row < b.row else "below"
  raise ValueError(f"cells ({a.row}, {a.col}) and ({b.row}, {b.col}) are not two different "
                   "cells of one row or one column")


# ---------------------------------------------------------------------------------------------
# Sampling


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown shapes-v1 split {split!r}; choose one of {list(SPLITS)}")


def _check_int(name: str, value, minimum: int) -> int:
  # bool is an int subclass, but True as an image size or index is always a mistake.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
  if value < minimum:
    raise ValueError(f"{name}={value}: must be >= {minimum}")
  return int(value)


def _valid(n: int, draws: list[int], split: str) -> bool:
  if n == 2:
    ca, _, _, cell_a, cb, _, _, cell_b = draws
    if ca == cb or cell_a == cell_b:
      return False
    if cell_a // 3 != cell_b // 3 and cell_a % 3 != cell_b % 3:
      return False
  if split == "test":
    return True
  heldout = any(_HELDOUT[draws[i]][draws[i + 1]] for i in range(0, 4 * n, 4))
  return heldout if split == "test_heldout" else not heldout


def sample_scene(rng: np.random.Generator, split: str) -> Scene:
  """A random scene of `split`, drawn with `rng`.

  The object count is one or two with probability 1/2 each, in every split. Then rejection
  sampling: all colours, shapes, sizes and cells are drawn independently and uniformly, and
  redrawn together until the two-object rules (different colours, different cells of one row
  or column) and the split's held-out rule hold. The accepted draw is therefore uniform over
  the valid scenes with that many objects, i.e. exactly the spec's distribution conditioned
  on the rules. Drawing the count outside the loop keeps train and test_heldout at 50/50 (a
  whole-scene rejection would tilt test_heldout to about 2:1 two-object scenes, since two
  objects are twice as likely to include a held-out pair).
  """
  _check_split(split)
  n = 1 if rng.random() < 0.5 else 2
  highs = _DRAW_HIGHS[n]
  while True:
    draws = rng.integers(highs).tolist()
    if _valid(n, draws, split):
      break
  jitter = rng.uniform(-JITTER, JITTER, size=2 * n).tolist()
  objects = []
  for i in range(n):
    color, shape, size, cell = draws[4 * i:4 * i + 4]
    row, col = divmod(cell, 3)
    objects.append(ShapeObject(
        _COLOR_NAMES[color], SHAPES[shape], _SIZE_NAMES[size], row, col,
        CELL_CENTRES[col] + jitter[2 * i], CELL_CENTRES[row] + jitter[2 * i + 1]))
  if n == 1:
    return Scene(tuple(objects), position=_PHRASES[draws[3]])
  return Scene(tuple(objects), relation=relation_of(*objects))


# ---------------------------------------------------------------------------------------------
# Rendering


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
  """Which sample points, at offsets dx (1, m) and dy (n, 1) from the centre, the shape covers."""
  h = s / 2
  ax, ay = np.abs(dx), np.abs(dy)
  if shape == "square":
    return (ax <= h) & (ay <= h)
  if shape == "circle":
    return dx * dx + dy * dy <= h * h
  if shape == "triangle":
    # Apex (0, -h), base y = +h from -h to +h: the half-width is (dy + h) / 2 on 0 <= dy + h.
    return (dy <= h) & (2 * ax <= dy + h)
  if shape == "diamond":
    return ax + ay <= h
  if shape == "cross":
    t = s / 6  # half of the bars' thickness s/3
    return ((ax <= h) & (ay <= t)) | ((ax <= t) & (ay <= h))
  raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def _block_counts(mask: np.ndarray) -> np.ndarray:
  """Covered samples per pixel (0..16) of a (4a, 4b) sample mask, as an (a, b) array.

  Strided slice sums, not a reshape-reduce (several times slower on 4-long axes) nor a matmul
  (multithreaded BLAS stalls on such small products, worst in parallel build workers).
  """
  m, k = mask.view(np.uint8), SUPERSAMPLE
  rows = m[0::k]
  for i in range(1, k):
    rows = rows + m[i::k]
  counts = rows[:, 0::k]
  for i in range(1, k):
    counts = counts + rows[:, i::k]
  return counts


def _window(obj: ShapeObject, w: int) -> tuple[float, float, float, int, int, int, int]:
  """Side and centre in canvas pixels, and the pixel rows/columns its bounding square touches."""
  try:
    s = SIZES[obj.size] * w
  except KeyError:
    raise ValueError(f"unknown size {obj.size!r}; choose one of {list(SIZES)}") from None
  cx, cy = obj.x * w, obj.y * w
  # floor(edge) + 1 also takes the pixel of a sample lying exactly on the far edge.
  c0, c1 = max(int(np.floor(cx - s / 2)), 0), min(int(np.floor(cx + s / 2)) + 1, w)
  r0, r1 = max(int(np.floor(cy - s / 2)), 0), min(int(np.floor(cy + s / 2)) + 1, w)
  return s, cx, cy, r0, r1, c0, c1


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
  """The scene as a (W, W, 3) uint8 image, W = image_size.

  Each object is sampled only inside its bounding window, at the centres of the 4x4
  sub-pixels; a pixel is the rounded mean of its 16 samples, each the colour of the last
  object covering it (black if none).
  """
  w = _check_int("image_size", image_size, 1)
  total = np.zeros((w, w, 3), np.int32)  # per pixel: sum of its 16 sample values
  windows = [_window(o, w) for o in scene.objects]
  for i, obj in enumerate(scene.objects):
    if obj.color not in _RGB:
      raise ValueError(f"unknown color {obj.color!r}; choose one of {list(COLORS)}")
    s, cx, cy, r0, r1, c0, c1 = windows[i]
    if r0 >= r1 or c0 >= c1:
      continue  # entirely off the canvas
    xs = (np.arange(c0 * SUPERSAMPLE, c1 * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys = (np.arange(r0 * SUPERSAMPLE, r1 * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    xs, ys = xs[None, :], ys[:, None]
    mask = _inside(obj.shape, xs - cx, ys - cy, s)
    for later, (s2, cx2, cy2, q0, q1, d0, d1) in zip(scene.objects[i + 1:], windows[i + 1:]):
      if q0 < r1 and r0 < q1 and d0 < c1 and c0 < d1:  # a later object may hide some samples
        mask &= ~_inside(later.shape, xs - cx2, ys - cy2, s2)
    total[r0:r1, c0:c1] += _block_counts(mask)[:, :, None] * _RGB[obj.color]
  half = SUPERSAMPLE * SUPERSAMPLE // 2
  return ((total + half) // (SUPERSAMPLE * SUPERSAMPLE)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Records


def record(scene: Scene, image_size: int = 64) -> dict:
  """The stored form of a scene: the features of the shapes_v1 tfds data set."""
  objects = scene.objects
  return {
      "image": render(scene, image_size),
      "caption": scene.caption,
      "num_objects": len(objects),
      "objects": {
          "color": [o.color for o in objects],
          "shape": [o.shape for o in objects],
          "size": [o.size for o in objects],
          "x": [float(o.x) for o in objects],
          "y": [float(o.y) for o in objects],
      },
      "position": scene.position or "",
      "relation": scene.relation or "",
  }


def example(split: str, index: int, image_size: int = 64, seed: int | None = None) -> dict:
  """Record `index` of `split`; it depends only on (split, index, seed), never on other records.

  The scene does not depend on `image_size`: the same index shows the same scene at any size.
  """
  _check_split(split)
  index = _check_int("index", index, 0)
  image_size = _check_int("image_size", image_size, 1)
  seed = SPLIT_SEEDS[split] if seed is None else _check_int("seed", seed, 0)
  rng = np.random.default_rng((seed, index))
  return record(sample_scene(rng, split), image_size)


def generate(split: str, num_examples: int, image_size: int = 64, seed: int | None = None,
             start: int = 0) -> Iterator[dict]:
  """Records start .. start + num_examples - 1 of `split`, in order."""
  # Checked here, not inside the generator, so bad arguments fail at the call.
  _check_split(split)
  num_examples = _check_int("num_examples", num_examples, 0)
  start = _check_int("start", start, 0)
  image_size = _check_int("image_size", image_size, 1)
  if seed is not None:
    _check_int("seed", seed, 0)
  return (example(split, i, image_size, seed) for i in range(start, start + num_examples))


# ---------------------------------------------------------------------------------------------
# Caption grammar


def _parse_object(words: list[str], at: int, caption: str) -> ParsedObject:
  parts = (("'a'", ("a",)), ("size", _SIZE_NAMES), ("color", _COLOR_NAMES), ("shape", SHAPES))
  for k, (what, allowed) in enumerate(parts):
    if at + k >= len(words):
      raise ValueError(f"caption {caption!r} ends early: expected {what} after "
                       f"{' '.join(words[:at + k])!r}")
    word = words[at + k]
    if word not in allowed:
      if what == "'a'":
        raise ValueError(f"expected 'a' to start an object, got {word!r} (word {at + k + 1}) in "
                         f"caption {caption!r}")
      raise ValueError(f"unknown {what} {word!r} (word {at + k + 1}) in caption {caption!r}; "
                       f"expected one of {list(allowed)}")
  return ParsedObject(color=words[at + 2], shape=words[at + 3], size=words[at + 1])


def parse_caption(caption: str) -> ParsedCaption:
  """The objects and the position phrase or relation that a shapes-v1 caption names.

  Grammar: `a SIZE COLOR SHAPE POSITION` or `a SIZE COLOR SHAPE RELATION a SIZE COLOR SHAPE`.
  Case and runs of whitespace are ignored (prompts are often typed by hand); anything else
  outside the grammar raises ValueError naming the offending word or phrase. Scene rules that
  are not grammar (two objects of one colour) are not checked.
  """
  if not isinstance(caption, str):
    raise ValueError(f"caption must be a str, got {type(caption).__name__}")
  words = caption.lower().split()
  if not words:
    raise ValueError("empty caption")
  first = _parse_object(words, 0, caption)
  rest = words[4:]
  phrases = [(p, "position") for p in POSITIONS] + [(r, "relation") for r in RELATIONS]
  matches = [(p, kind) for p, kind in phrases
             if rest[:len(p.split())] == p.split()]
  if not matches:
    if not rest:
      raise ValueError(f"caption {caption!r} ends after the first object: expected a position "
                       f"{list(POSITIONS)} or a relation {list(RELATIONS)}")
    # The word where every phrase stops matching is the one to blame.
    agree = max(_common_prefix(rest, p.split()) for p, _ in phrases)
    if agree == len(rest):
      raise ValueError(f"caption {caption!r} ends inside a phrase: {' '.join(rest)!r} is not a "
                       f"position {list(POSITIONS)} or a relation {list(RELATIONS)}")
    raise ValueError(f"unknown position or relation {' '.join(rest)!r} (word {rest[agree]!r}) "
                     f"in caption {caption!r}; expected a position {list(POSITIONS)} or a "
                     f"relation {list(RELATIONS)}")
  phrase, kind = max(matches, key=lambda m: len(m[0]))
  at = 4 + len(phrase.split())
  if kind == "position":
    parsed = ParsedCaption((first,), position=phrase)
  else:
    parsed = ParsedCaption((first, _parse_object(words, at, caption)), relation=phrase)
    at += 4
  if at < len(words):
    raise ValueError(f"unexpected words {' '.join(words[at:])!r} at the end of caption "
                     f"{caption!r}")
  return parsed


def _common_prefix(a: list[str], b: list[str]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n
