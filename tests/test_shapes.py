"""shapes-v1 generator against its spec (../shared/specs/shapes-v1.md)."""

import itertools
import math

import numpy as np
import pytest

from jaxt2i.data import shapes


def one(shape="square", color="red", size="large", row=1, col=1, jitter=(0.0, 0.0)):
  obj = shapes.ShapeObject(color, shape, size, row, col, shapes._THIRDS[col] + jitter[0],
                           shapes._THIRDS[row] + jitter[1])
  return shapes.Scene((obj,), position=shapes._CELL_PHRASE[(row, col)])


def test_palette_and_background_are_exact():
  for color, rgb in shapes.COLORS.items():
    image = shapes.render(one(color=color), 64)
    assert tuple(image[32, 32]) == rgb
    assert not image[:5].any() and not image[:, :5].any()  # far from the object: black


def test_edges_are_antialiased():
  # A circle's rim cuts through pixels: some values lie strictly between black and the colour.
  image = shapes.render(one("circle", "white"), 64)[..., 0]
  assert ((image > 0) & (image < 240)).sum() > 20


@pytest.mark.parametrize("shape,area", [
    ("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5), ("diamond", 0.5),
    ("cross", 5 / 9)])
def test_covered_area_matches_geometry(shape, area):
  w = 128
  image = shapes.render(one(shape, "white", "large"), w)
  coverage = image[..., 0].astype(np.float64).sum() / 240.0
  s = shapes.SIZES["large"] * w
  assert coverage == pytest.approx(area * s * s, rel=0.02)


def test_triangle_points_up_and_cross_has_thin_bars():
  image = shapes.render(one("triangle", "white", "large"), 128)[..., 0] > 120
  rows = image.sum(axis=1)
  filled = np.nonzero(rows)[0]
  assert rows[filled[0]] < rows[filled[-1]]  # narrow apex at the top, wide base below
  cross = shapes.render(one("cross", "white", "large"), 120)[..., 0] > 120
  s = shapes.SIZES["large"] * 120
  assert abs(cross[60].sum() - s) <= 2 and abs(cross[60 - int(s / 3)].sum() - s / 3) <= 2


def test_centroid_at_cell_centre():
  for row, col in itertools.product(range(3), range(3)):
    image = shapes.render(one("circle", "white", "small", row, col), 96)[..., 0].astype(float)
    ys, xs = np.indices(image.shape)
    cx, cy = (xs * image).sum() / image.sum() + 0.5, (ys * image).sum() / image.sum() + 0.5
    assert cx / 96 == pytest.approx(shapes._THIRDS[col], abs=0.005)
    assert cy / 96 == pytest.approx(shapes._THIRDS[row], abs=0.005)


def test_captions_follow_the_grammar():
  assert one("circle", "red", "small", 0, 0).caption == "a small red circle in the top left"
  a = shapes.ShapeObject("blue", "square", "large", 0, 1, 0.5, 1 / 6)
  b = shapes.ShapeObject("yellow", "triangle", "small", 2, 1, 0.5, 5 / 6)
  scene = shapes.Scene((a, b), relation=shapes.relation_of(a, b))
  assert scene.caption == "a large blue square above a small yellow triangle"


@pytest.fixture(scope="module")
def samples():
  return {split: [shapes.sample_scene(np.random.default_rng((7, i)), split) for i in range(3000)]
          for split in shapes.SPLITS}


def test_split_rules(samples):
  def heldout(scene):
    return any((o.color, o.shape) in shapes.HELDOUT_PAIRS for o in scene.objects)
  assert not any(heldout(s) for s in samples["train"])
  assert all(heldout(s) for s in samples["test_heldout"])
  fraction = np.mean([heldout(s) for s in samples["test"]])
  assert 0.1 < fraction < 0.3  # 1/8 per object, one or two objects


def test_two_object_rules_and_balance(samples):
  scenes = samples["test"]
  two = [s for s in scenes if len(s.objects) == 2]
  assert 0.45 < len(two) / len(scenes) < 0.55
  relations = set()
  for scene in two:
    a, b = scene.objects
    assert a.color != b.color
    assert (a.row == b.row) != (a.col == b.col)
    relations.add(scene.relation)
    if scene.relation == "to the left of":
      assert a.x < b.x and a.row == b.row
    elif scene.relation == "to the right of":
      assert a.x > b.x
    elif scene.relation == "above":
      assert a.y < b.y and a.col == b.col
    else:
      assert scene.relation == "below" and a.y > b.y
    for o in scene.objects:
      assert abs(o.x - shapes._THIRDS[o.col]) <= 0.01 and abs(o.y - shapes._THIRDS[o.row]) <= 0.01
  assert relations == set(shapes.RELATIONS)
  colors = {o.color for s in scenes for o in s.objects}
  assert colors == set(shapes.COLORS)


def test_later_object_drawn_on_top():
  a = shapes.ShapeObject("red", "square", "large", 1, 1, 0.5, 0.5)
  b = shapes.ShapeObject("blue", "circle", "small", 1, 1, 0.5, 0.5)
  image = shapes.render(shapes.Scene((a, b), relation="above"), 64)
  assert tuple(image[32, 32]) == shapes.COLORS["blue"]


def test_deterministic_random_access():
  a = shapes.example("test", 17, 32)
  b = list(shapes.generate("test", 3, 32, start=16))[1]
  assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
  c = shapes.example("test", 17, 32, seed=5)
  assert c["caption"] != a["caption"] or not np.array_equal(c["image"], a["image"])
  train = [shapes.example("train", i)["caption"] for i in range(20)]
  test = [shapes.example("test", i)["caption"] for i in range(20)]
  assert train != test  # each split has its own seed


@pytest.mark.parametrize("size", [32, 64, 128])
def test_record_format_and_sizes(size):
  record = shapes.example("test_heldout", 3, size)
  assert record["image"].shape == (size, size, 3) and record["image"].dtype == np.uint8
  n = record["num_objects"]
  assert n in (1, 2) and all(len(v) == n for v in record["objects"].values())
  assert bool(record["position"]) == (n == 1) and bool(record["relation"]) == (n == 2)


def test_parse_caption_round_trip_and_errors(samples):
  for scene in samples["test"][:500]:
    parsed = shapes.parse_caption(scene.caption)
    assert [(p.size, p.color, p.shape) for p in parsed.objects] == [
        (o.size, o.color, o.shape) for o in scene.objects]
    assert parsed.position == scene.position and parsed.relation == scene.relation
  with pytest.raises(ValueError, match="unknown colour 'magenta'"):
    shapes.parse_caption("a small magenta circle in the top left")
  with pytest.raises(ValueError, match="not in the shapes-v1 grammar"):
    shapes.parse_caption("two red circles")


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown shapes-v1 split 'val'"):
    shapes.example("val", 0)
  with pytest.raises(ValueError, match="image_size"):
    shapes.render(one(), 0)
  with pytest.raises(ValueError, match="num_examples"):
    list(shapes.generate("train", -1))
