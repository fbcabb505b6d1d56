"""shapes-v1 generator against its spec (../shared/specs/shapes-v1.md)."""

import collections
import math
import re

import numpy as np
import pytest

from jaxt2i.data import shapes

THIRDS = (1 / 6, 1 / 2, 5 / 6)


def scene_of(shape="square", color="white", size="large", row=1, col=1, jitter=(0.0, 0.0)):
  obj = shapes.ShapeObject(color, shape, size, row, col, THIRDS[col] + jitter[0],
                           THIRDS[row] + jitter[1])
  return shapes.Scene((obj,), position=shapes.position_phrase(row, col))


def reference_render(scene, w):
  """Whole-canvas 4x supersampling with the spec's geometry written as polygons."""
  c = (np.arange(4 * w) + 0.5) / 4
  px, py = np.meshgrid(c, c)
  canvas = np.zeros((4 * w, 4 * w, 3), np.int64)

  def polygon(*vertices):
    sides = [(bx - ax) * (py - ay) - (by - ay) * (px - ax)
             for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1])]
    return np.all([d >= 0 for d in sides], axis=0) | np.all([d <= 0 for d in sides], axis=0)

  for o in scene.objects:
    s = shapes.SIZES[o.size] * w
    x, y, h, t = o.x * w, o.y * w, s / 2, s / 6
    inside = {
        "square": lambda: polygon((x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)),
        "circle": lambda: np.hypot(px - x, py - y) <= h,
        "triangle": lambda: polygon((x, y - h), (x + h, y + h), (x - h, y + h)),
        "diamond": lambda: polygon((x, y - h), (x + h, y), (x, y + h), (x - h, y)),
        "cross": lambda: (polygon((x - h, y - t), (x + h, y - t), (x + h, y + t), (x - h, y + t))
                          | polygon((x - t, y - h), (x + t, y - h), (x + t, y + h),
                                    (x - t, y + h))),
    }[o.shape]()
    canvas[inside] = shapes.COLORS[o.color]
  sums = canvas.reshape(w, 4, w, 4, 3).sum(axis=(1, 3))
  return ((sums + 8) // 16).astype(np.uint8)  # round half up


@pytest.fixture(scope="module")
def samples():
  return {split: [shapes.sample_scene(np.random.default_rng((99, i)), split)
                  for i in range(4000)]
          for split in shapes.SPLITS}


def test_constants_follow_the_spec():
  assert list(shapes.COLORS.items())[:2] == [("red", (230, 30, 30)), ("green", (30, 170, 40))]
  assert list(shapes.COLORS) == ["red", "green", "blue", "yellow", "purple", "orange", "cyan",
                                 "white"]
  assert shapes.COLORS["cyan"] == (40, 210, 220) and shapes.COLORS["white"] == (240, 240, 240)
  assert list(shapes.POSITIONS)[::4] == ["in the top left", "in the center",
                                         "in the bottom right"]
  # Row-major: phrase i sits in row i // 3, column i % 3.
  for i, (phrase, (x, y)) in enumerate(shapes.POSITIONS.items()):
    assert (x, y) == (THIRDS[i % 3], THIRDS[i // 3]) == shapes.POSITIONS[
        shapes.position_phrase(i // 3, i % 3)]
  assert shapes.HELDOUT_PAIRS == {("purple", "triangle"), ("orange", "circle"),
                                  ("cyan", "square"), ("white", "diamond"), ("green", "cross")}
  assert set(shapes.SPLIT_SEEDS) == set(shapes.SPLITS)
  assert len(set(shapes.SPLIT_SEEDS.values())) == 3


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_exact_colour_inside_black_outside_and_pure_blends(shape):
  for color, rgb in shapes.COLORS.items():
    image = shapes.render(scene_of(shape, color, "large", jitter=(0.004, -0.007)), 64)
    assert tuple(image[32, 32]) == rgb
    # Bounding square, jittered centre (32.256, 31.552), side 19.2: pixels 22..41 x 21..41.
    outside = np.ones((64, 64), bool)
    outside[21:42, 22:42] = False
    assert not image[outside].any()
    # Every pixel is the colour at some coverage k/16 (rounded half up): no other colour leaks.
    blends = (np.arange(17)[:, None] * np.array(rgb) + 8) // 16
    pixels = image.reshape(-1, 1, 3).astype(int)
    assert (pixels == blends[None]).all(axis=2).any(axis=1).all()
    partial = (pixels == blends[None, 1:16]).all(axis=2).any(axis=1)
    assert partial.sum() >= 20  # the edges are anti-aliased, not thresholded


@pytest.mark.parametrize("shape,area", [
    ("square", 1.0), ("circle", math.pi / 4), ("triangle", 0.5), ("diamond", 0.5),
    ("cross", 5 / 9)])
@pytest.mark.parametrize("size", ["small", "large"])
def test_covered_area_matches_geometry(shape, area, size):
  w = 128
  image = shapes.render(scene_of(shape, "white", size, 0, 2, (-0.006, 0.009)), w)
  # White is 240 = 15 * 16 in every channel, so value / 240 is the exact covered fraction.
  coverage = image[..., 0].astype(np.float64).sum() / 240.0
  s = shapes.SIZES[size] * w
  assert coverage == pytest.approx(area * s * s, rel=0.02)


def test_orientation_of_triangle_diamond_and_cross():
  w, s = 120, 0.30 * 120  # s = 36 px, centre at (60, 60): edges land on pixel boundaries
  alpha = {k: shapes.render(scene_of(k, "white", "large"), w)[..., 0] / 240.0
           for k in ("triangle", "diamond", "cross")}
  tri = alpha["triangle"][42:78].sum(axis=1)  # the bounding square's rows
  assert np.all(np.diff(tri) > 0)                        # widens downwards: apex up
  assert tri[0] == pytest.approx(0.5, abs=0.3) and tri[-1] == pytest.approx(s, abs=1)
  assert alpha["triangle"][42:60].sum() == pytest.approx(s * s / 8, rel=0.02)  # 1/4 above centre
  dia = alpha["diamond"]
  assert dia[59:61].sum(axis=1) == pytest.approx([s - 1, s - 1], abs=0.6)  # widest mid-row
  assert not dia[42:46, 42:46].any() and not dia[74:78, 74:78].any()      # corners empty
  cross = alpha["cross"]
  assert cross[60].sum() == pytest.approx(s, abs=0.01)       # horizontal bar: length s
  assert cross[45].sum() == pytest.approx(s / 3, abs=0.01)   # vertical bar only: thickness s/3
  assert cross[:, 60].sum() == pytest.approx(s, abs=0.01)
  assert not cross[42:48, 42:48].any()


def test_matches_whole_canvas_reference(samples):
  # Random scenes at random jitter: the windowed renderer must equal brute-force sampling of
  # the whole canvas, bit for bit (checks windows, clipping, blending and rounding).
  for scene in samples["test"][:120]:
    np.testing.assert_array_equal(shapes.render(scene, 32), reference_render(scene, 32))
  for scene in samples["test_heldout"][:15]:
    np.testing.assert_array_equal(shapes.render(scene, 64), reference_render(scene, 64))


def test_later_object_drawn_on_top():
  a = shapes.ShapeObject("red", "square", "large", 1, 1, 0.5, 0.5)
  b = shapes.ShapeObject("blue", "circle", "small", 1, 1, 0.52, 0.5)
  scene = shapes.Scene((a, b), relation="to the left of")
  image = shapes.render(scene, 64)
  assert tuple(image[32, 33]) == shapes.COLORS["blue"]
  assert tuple(image[32, 25]) == shapes.COLORS["red"]
  np.testing.assert_array_equal(image, reference_render(scene, 64))
  flipped = shapes.render(shapes.Scene((b, a), relation="to the right of"), 64)
  assert tuple(flipped[32, 33]) == shapes.COLORS["red"]


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_centroid_at_jittered_cell_centre(shape):
  w = 128
  rng = np.random.default_rng(3)
  for cell in range(9):
    row, col = divmod(cell, 3)
    jitter = rng.uniform(-0.01, 0.01, size=2)
    scene = scene_of(shape, "white", "small" if cell % 2 else "large", row, col, jitter)
    obj = scene.objects[0]
    alpha = shapes.render(scene, w)[..., 0].astype(np.float64)
    ys, xs = np.indices(alpha.shape) + 0.5
    cx, cy = (xs * alpha).sum() / alpha.sum() / w, (ys * alpha).sum() / alpha.sum() / w
    if shape == "triangle":
      cy -= shapes.SIZES[obj.size] / 6  # a triangle's centroid is a third of the way up
    assert cx == pytest.approx(obj.x, abs=0.0016) and cy == pytest.approx(obj.y, abs=0.0016)
    assert abs(cx - THIRDS[col]) <= 0.0116 and abs(cy - THIRDS[row]) <= 0.0116


def test_captions_match_the_spec_examples():
  assert scene_of("circle", "red", "small", 0, 0).caption == "a small red circle in the top left"
  a = shapes.ShapeObject("blue", "square", "large", 0, 1, 0.5, 1 / 6)
  b = shapes.ShapeObject("yellow", "triangle", "small", 2, 1, 0.5, 5 / 6)
  scene = shapes.Scene((a, b), relation=shapes.relation_of(a, b))
  assert scene.caption == "a large blue square above a small yellow triangle"
  assert scene_of("cross", "cyan", "large", 2, 1).caption == "a large cyan cross at the bottom"


def test_generated_captions_follow_the_grammar(samples):
  word = lambda xs: "(" + "|".join(xs) + ")"
  obj = f"a {word(shapes.SIZES)} {word(shapes.COLORS)} {word(shapes.SHAPES)}"
  one = re.compile(f"{obj} {word(shapes.POSITIONS)}")
  two = re.compile(f"{obj} {word(shapes.RELATIONS)} {obj}")
  for scene in samples["test"][:1000]:
    caption = scene.caption
    o = scene.objects
    if len(o) == 1:
      assert one.fullmatch(caption).groups() == (o[0].size, o[0].color, o[0].shape,
                                                 scene.position)
      assert scene.position == shapes.position_phrase(o[0].row, o[0].col)
    else:
      assert two.fullmatch(caption).groups() == (o[0].size, o[0].color, o[0].shape,
                                                 scene.relation, o[1].size, o[1].color,
                                                 o[1].shape)


def test_split_rules(samples):
  assert not any(s.heldout for s in samples["train"])
  assert all(s.heldout for s in samples["test_heldout"])
  # Full distribution: 1/8 of one-object scenes, 1/4 - 1/70 of two-object scenes.
  assert np.mean([s.heldout for s in samples["test"]]) == pytest.approx(0.180, abs=0.025)
  pairs = lambda split: collections.Counter(
      (o.color, o.shape) for s in samples[split] for o in s.objects)
  allowed = {(c, k) for c in shapes.COLORS for k in shapes.SHAPES} - shapes.HELDOUT_PAIRS
  assert set(pairs("train")) == allowed
  assert set(pairs("test")) == allowed | shapes.HELDOUT_PAIRS
  heldout = pairs("test_heldout")
  total = sum(heldout[p] for p in shapes.HELDOUT_PAIRS)
  for p in shapes.HELDOUT_PAIRS:  # every held-out pair equally likely
    assert heldout[p] / total == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_one_or_two_objects_half_and_half(samples, split):
  two = np.mean([len(s.objects) == 2 for s in samples[split]])
  # Whole-scene rejection would give about 0.65 in test_heldout and 0.47 in train.
  assert two == pytest.approx(0.5, abs=0.03)
  assert {len(s.objects) for s in samples[split]} == {1, 2}


def test_attributes_are_uniform(samples):
  scenes = samples["test"]
  objects = [o for s in scenes for o in s.objects]
  for attribute, values in (("color", shapes.COLORS), ("shape", shapes.SHAPES),
                            ("size", shapes.SIZES)):
    freq = collections.Counter(getattr(o, attribute) for o in objects)
    assert set(freq) == set(values)
    for v in values:
      assert freq[v] / len(objects) == pytest.approx(1 / len(values), abs=0.025), (attribute, v)
  for key, values in (("position", shapes.POSITIONS), ("relation", shapes.RELATIONS)):
    freq = collections.Counter(getattr(s, key) for s in scenes if getattr(s, key))
    assert set(freq) == set(values)
    for v in values:  # about 2000 scenes each: 5 standard deviations
      assert freq[v] / sum(freq.values()) == pytest.approx(1 / len(values), abs=0.04), v


def test_two_object_rules(samples):
  two = [s for split in shapes.SPLITS for s in samples[split] if len(s.objects) == 2]
  for scene in two:
    a, b = scene.objects
    assert a.color != b.color
    assert (a.row == b.row) != (a.col == b.col)  # one shared line, two different cells
    assert scene.position is None
    if scene.relation == "to the left of":
      assert a.row == b.row and a.x < b.x - 0.3
    elif scene.relation == "to the right of":
      assert a.row == b.row and a.x > b.x + 0.3
    elif scene.relation == "above":
      assert a.col == b.col and a.y < b.y - 0.3
    else:
      assert scene.relation == "below" and a.col == b.col and a.y > b.y + 0.3
  for scene in (s for split in shapes.SPLITS for s in samples[split]):
    for o in scene.objects:
      assert abs(o.x - THIRDS[o.col]) <= 0.01 and abs(o.y - THIRDS[o.row]) <= 0.01
  jitter = np.array([o.x - THIRDS[o.col] for s in samples["test"] for o in s.objects])
  assert jitter.min() < -0.009 and jitter.max() > 0.009 and abs(jitter.mean()) < 0.0005


def test_record_format():
  for index in range(8):
    r = shapes.example("test", index, 32)
    assert set(r) == {"image", "caption", "num_objects", "objects", "position", "relation"}
    assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
    assert type(r["caption"]) is str and type(r["num_objects"]) is int
    n = r["num_objects"]
    assert set(r["objects"]) == {"color", "shape", "size", "x", "y"}
    assert all(len(v) == n for v in r["objects"].values())
    assert all(type(x) is float for x in r["objects"]["x"] + r["objects"]["y"])
    assert all(type(c) is str for k in ("color", "shape", "size") for c in r["objects"][k])
    assert (r["position"] != "") == (n == 1) and (r["relation"] != "") == (n == 2)
    parsed = shapes.parse_caption(r["caption"])
    assert [o.color for o in parsed.objects] == r["objects"]["color"]


def test_deterministic_random_access():
  a = shapes.example("test", 17, 32)
  again = shapes.example("test", 17, 32)
  assert a["image"].tobytes() == again["image"].tobytes() and a["caption"] == again["caption"]
  b = list(shapes.generate("test", 3, 32, start=16))[1]
  assert a["caption"] == b["caption"] and a["image"].tobytes() == b["image"].tobytes()
  assert a["objects"] == b["objects"]
  images = lambda **kw: [r["image"].tobytes() for r in shapes.generate("test", 10, 32, **kw)]
  default = images()
  assert default == images(seed=shapes.SPLIT_SEEDS["test"])
  assert sum(x != y for x, y in zip(default, images(seed=5))) >= 8
  assert len(set(default)) == 10
  captions = lambda split: [r["caption"] for r in shapes.generate(split, 10, 8)]
  assert sum(x != y for x, y in zip(captions("train"), captions("test"))) >= 5


@pytest.mark.parametrize("size", [32, 64, 128])
def test_image_sizes(size):
  for index in range(3):
    r = shapes.example("test_heldout", index, size)
    image = r["image"]
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    # The scene does not depend on the size; only its sampling does.
    assert r["caption"] == shapes.example("test_heldout", index, 64)["caption"]
    scene = shapes.sample_scene(
        np.random.default_rng((shapes.SPLIT_SEEDS["test_heldout"], index)), "test_heldout")
    assert scene.caption == r["caption"]
    np.testing.assert_array_equal(image, reference_render(scene, size))
    for color, x, y in zip(*(r["objects"][k] for k in ("color", "x", "y"))):
      # The pixel holding the centre is mostly covered, by this object's colour alone.
      blends = (np.arange(8, 17)[:, None] * np.array(shapes.COLORS[color]) + 8) // 16
      assert (image[int(y * size), int(x * size)] == blends).all(axis=1).any()


def test_parse_caption_round_trips(samples):
  for scene in (s for split in shapes.SPLITS for s in samples[split]):
    parsed = shapes.parse_caption(scene.caption)
    assert [(p.color, p.shape, p.size) for p in parsed.objects] == [
        (o.color, o.shape, o.size) for o in scene.objects]
    assert (parsed.position, parsed.relation) == (scene.position, scene.relation)
    assert parsed.caption == scene.caption
  assert shapes.parse_caption("  A Large  BLUE square above a small yellow triangle ").relation \
      == "above"


@pytest.mark.parametrize("caption,message", [
    ("a small magenta circle in the top left", "unknown color 'magenta'"),
    ("a huge red circle in the top left", "unknown size 'huge'"),
    ("a small red hexagon in the top left", "unknown shape 'hexagon'"),
    ("the small red circle in the top left", "expected 'a' to start an object, got 'the'"),
    ("a small red circle in the middle", "word 'middle'"),
    ("a small red circle next to a large blue square", "word 'next'"),
    ("a small red circle in the top", "ends inside a phrase: 'in the top'"),
    ("a small red circle", "ends after the first object"),
    ("a small red circle above a large", "ends early: expected color"),
    ("a small red circle above the large blue square", "got 'the' \\(word 6\\)"),
    ("a small red circle in the center please", "unexpected words 'please'"),
    ("a small red circle above a large blue square twice", "unexpected words 'twice'"),
    ("", "empty caption"),
])
def test_parse_caption_names_the_problem(caption, message):
  with pytest.raises(ValueError, match=message):
    shapes.parse_caption(caption)


def test_bad_arguments():
  scene = scene_of()
  with pytest.raises(ValueError, match="unknown shapes-v1 split 'val'"):
    shapes.example("val", 0)
  with pytest.raises(ValueError, match="unknown shapes-v1 split"):
    shapes.generate("validation", 1)  # at the call, not at the first next()
  with pytest.raises(ValueError, match="unknown shapes-v1 split"):
    shapes.sample_scene(np.random.default_rng(0), "Train")
  for bad in (0, -64, 64.0, True, "64"):
    with pytest.raises(ValueError, match="image_size"):
      shapes.render(scene, bad)
    with pytest.raises(ValueError, match="image_size"):
      shapes.generate("train", 1, image_size=bad)
  with pytest.raises(ValueError, match="num_examples=-1"):
    shapes.generate("train", -1)
  with pytest.raises(ValueError, match="index=-1"):
    shapes.example("train", -1)
  with pytest.raises(ValueError, match="start=-2"):
    shapes.generate("train", 3, start=-2)
  with pytest.raises(ValueError, match="seed=-1"):
    shapes.example("train", 0, seed=-1)
  bad_shape = shapes.Scene((shapes.ShapeObject("red", "star", "small", 0, 0, 0.2, 0.2),), "x")
  with pytest.raises(ValueError, match="unknown shape 'star'"):
    shapes.render(bad_shape)
  with pytest.raises(ValueError, match="not two different cells"):
    shapes.relation_of(scene.objects[0], scene.objects[0])
  assert list(shapes.generate("train", 0)) == []
