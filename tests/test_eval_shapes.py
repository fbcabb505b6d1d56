"""shapes-v1 scoring: the matching rules, the evaluator's labels, calibration, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxt2i.data import shapes as shapes_data
from jaxt2i.eval import shapes
from jaxt2i.eval.shapes import Detection, judge
from jaxt2i.tasks import shapes_evaluator as task_lib

from helpers import REPO


def det(color, shape, size, x, y):
  return Detection(color, shape, size, x, y, 0.99)


# -- matching rules (no network) ------------------------------------------------------------


def test_single_object_correct_and_each_attribute_wrong():
  caption = "a small red circle in the top left"
  good = judge(caption, [det("red", "circle", "small", 0.17, 0.16)])
  assert good["correct"] and good["place"] and good["count"]
  for field, value in (("color", "blue"), ("shape", "square"), ("size", "large")):
    kwargs = {"color": "red", "shape": "circle", "size": "small", field: value}
    v = judge(caption, [det(kwargs["color"], kwargs["shape"], kwargs["size"], 0.17, 0.16)])
    assert not v["correct"]
    assert v["objects"][field] == [False]
    assert all(all(v["objects"][f]) for f in ("color", "shape", "size") if f != field)
  wrong_cell = judge(caption, [det("red", "circle", "small", 0.5, 0.16)])
  assert not wrong_cell["correct"] and not wrong_cell["place"]
  missing = judge(caption, [])
  assert not missing["correct"] and missing["objects"]["color"] == [False]
  assert not missing["count"]


def test_relations_need_the_gap_and_direction():
  caption = "a large blue square above a small yellow triangle"
  a = det("blue", "square", "large", 0.5, 0.17)
  assert judge(caption, [a, det("yellow", "triangle", "small", 0.5, 0.50)])["correct"]
  # B higher than A: relation wrong.
  assert not judge(caption, [a, det("yellow", "triangle", "small", 0.5, 0.10)])["correct"]
  # Below, but by less than 0.15 W.
  near = judge(caption, [a, det("yellow", "triangle", "small", 0.5, 0.30)])
  assert not near["place"] and not near["correct"]
  # Order of detections does not matter; an extra object only costs `count`.
  extra = judge(caption, [det("green", "cross", "small", 0.8, 0.8),
                          det("yellow", "triangle", "small", 0.5, 0.5), a])
  assert extra["correct"] and not extra["count"]
  for relation, (xa, ya, xb, yb) in {"to the left of": (0.17, 0.5, 0.5, 0.5),
                                     "to the right of": (0.83, 0.5, 0.5, 0.5),
                                     "below": (0.5, 0.83, 0.5, 0.5)}.items():
    cap = f"a large blue square {relation} a small yellow triangle"
    pair = [det("blue", "square", "large", xa, ya), det("yellow", "triangle", "small", xb, yb)]
    assert judge(cap, pair)["correct"], relation
    swapped = [det("blue", "square", "large", xb, yb), det("yellow", "triangle", "small", xa, ya)]
    assert not judge(cap, swapped)["correct"], relation


def test_swapped_colours_are_wrong_whatever_the_matching():
  caption = "a small red circle to the left of a large blue square"
  image = [det("blue", "circle", "small", 0.17, 0.5), det("red", "square", "large", 0.5, 0.5)]
  v = judge(caption, image)
  assert not v["correct"]
  # Same shapes and sizes: colours swapped means the relation is reversed.
  caption = "a small red circle to the left of a small blue circle"
  image = [det("blue", "circle", "small", 0.17, 0.5), det("red", "circle", "small", 0.5, 0.5)]
  assert not judge(caption, image)["correct"]


def test_summary_fractions():
  verdicts = [judge("a small red circle in the top left", [det("red", "circle", "small", .17, .17)]),
              judge("a small red circle in the top left", [det("red", "square", "small", .17, .17)]),
              judge("a small red circle above a large blue cross",
                    [det("red", "circle", "small", .5, .17), det("blue", "cross", "small", .5, .5)])]
  s = shapes.summarize(verdicts)
  assert s["num_images"] == 3
  assert s["fully_correct"] == pytest.approx(1 / 3)
  assert s["per_attribute"]["shape"] == pytest.approx(3 / 4)   # per object: 4 named objects
  assert s["per_attribute"]["size"] == pytest.approx(3 / 4)
  assert s["per_attribute"]["color"] == 1.0
  assert s["per_attribute"]["place"] == 1.0
  assert s["per_attribute"]["count"] == 1.0


def test_labels_decode_back_to_the_scene():
  """Targets built from records, written as confident logits, decode to a correct verdict."""
  for i in range(40):
    record = shapes_data.example("test", i, 64)
    t = task_lib.record_targets(record)
    assert t["present"].sum() == record["num_objects"]
    big = 20.0
    pred = {"present": np.where(t["present"] > 0, big, -big)[None],
            "color": np.eye(len(task_lib.COLOR_NAMES))[t["color"]][None] * big,
            "shape": np.eye(len(shapes_data.SHAPES))[t["shape"]][None] * big,
            "size": np.eye(2)[t["size"]][None] * big,
            "offset": t["offset"][None]}
    (found,) = shapes.decode(pred)
    verdict = judge(record["caption"], found)
    assert verdict["correct"] and verdict["count"], (record["caption"], found)
    for d in found:
      assert any(abs(d.x - x) < 1e-6 and abs(d.y - y) < 1e-6
                 for x, y in zip(record["objects"]["x"], record["objects"]["y"]))


def test_generated_sources():
  split = task_lib.GeneratedScenes("test_heldout", 32, 10)
  ref = shapes_data.example("test_heldout", 3, 32)
  np.testing.assert_array_equal(split[3]["image"], ref["image"])
  assert split[3]["caption"] == ref["caption"]
  train = task_lib.GeneratedScenes("evaluator", 64, 1000, seed=3)
  a, b = train[5], task_lib.GeneratedScenes("evaluator", 64, 1000, seed=3)[5]
  np.testing.assert_array_equal(a["image"], b["image"])
  counts = {len(train[i]["objects"]["color"]) for i in range(200)}
  assert counts == {0, 1, 2, 3}
  heldout_seen = {(c, s) for i in range(300) for c, s in zip(train[i]["objects"]["color"],
                                                              train[i]["objects"]["shape"])}
  assert shapes_data.HELDOUT_PAIRS <= heldout_seen  # it learns the held-out pairs too
  assert repr(train) == repr(task_lib.GeneratedScenes("evaluator", 64, 1000, seed=3))
  with pytest.raises(ValueError, match="unknown scene kind"):
    task_lib.GeneratedScenes("validation", 64, 10)


def test_bad_inputs_are_named(quick_evaluator_64):
  evaluator_64 = quick_evaluator_64
  images = np.stack([shapes_data.example("test", i, 64)["image"] for i in range(3)])
  captions = [shapes_data.example("test", i, 64)["caption"] for i in range(3)]
  with pytest.raises(ValueError, match="3 images but 2 captions"):
    shapes.score(images, captions[:2], evaluator=evaluator_64)
  with pytest.raises(ValueError, match="caption 1: unknown color 'pink'"):
    shapes.score(images, [captions[0], "a small pink circle in the center", captions[2]],
                 evaluator=evaluator_64)
  with pytest.raises(ValueError, match="expected uint8"):
    shapes.score(images.astype(np.float32) / 255, captions, evaluator=evaluator_64)


# -- the trained evaluator -----------------------------------------------------------------


@pytest.mark.parametrize("split", ["test", "test_heldout"])
@pytest.mark.slow  # the real evaluator (trained once per machine, ~3 min)
def test_calibration_64px(evaluator_64, split):
  """Real images score >= 98% fully correct; colour-swapped or shuffled captions < 5%."""
  cal = shapes.calibrate(evaluator_64, split, num_images=500)
  assert cal["fully_correct"] >= 0.98, cal
  assert cal["swapped_colors_fully_correct"] < 0.05, cal
  assert cal["shuffled_captions_fully_correct"] < 0.05, cal


@pytest.mark.slow
def test_other_sizes_are_resized(evaluator_64):
  records = [shapes_data.example("test", i, 128) for i in range(64)]
  report = shapes.score(np.stack([r["image"] for r in records]), [r["caption"] for r in records],
                        evaluator=evaluator_64, include_images=True)
  assert report["fully_correct"] >= 0.95
  assert len(report["images"]) == 64 and "detected" in report["images"][0]


@pytest.mark.slow
def test_calibration_32px():
  scorer = shapes.load_evaluator(32)
  for split in ("test", "test_heldout"):
    cal = shapes.calibrate(scorer, split, num_images=1000)
    assert cal["fully_correct"] >= 0.95, cal
    assert cal["swapped_colors_fully_correct"] < 0.05, cal
    assert cal["shuffled_captions_fully_correct"] < 0.05, cal


@pytest.mark.slow
def test_evaluator_cache_is_complete(evaluator_64):
  info = json.loads((evaluator_64.directory / "evaluator.json").read_text())
  assert info["version"] == shapes.EVALUATOR_VERSION and info["image_size"] == 64
  assert info["calibration"]["test"]["fully_correct"] >= 0.98
  # A second load reuses the cache: no training.
  assert shapes.train_evaluator(64, str(evaluator_64.directory.parent.parent)) == \
      evaluator_64.directory


def test_evaluator_stopped_by_sigterm_is_not_marked_ready(tmp_path, monkeypatch):
  # A SIGTERM during the evaluator's training leaves a checkpoint but no evaluator.json, so a
  # half-trained evaluator never scores anything.
  from jaxt2i.training import trainer as trainer_lib
  config = shapes.evaluator_config(32)
  config.train.num_steps = 4
  config.train.log_every = 1
  config.batch_size = 8
  config.data.worker_count = 0
  config.model.channels = (8, 16, 16)
  config.model.feature_dim = 16
  config.checkpoint.every_steps = 100
  monkeypatch.setattr(trainer_lib._PreemptionWatcher, "reached", lambda self, step: step >= 2)
  with pytest.raises(RuntimeError, match=r"stopped at step 2 of 4; it resumes"):
    shapes.train_evaluator(32, str(tmp_path), config=config, calibration_images=8)
  directory = shapes.evaluator_dir(32, str(tmp_path))
  assert not (directory / "evaluator.json").exists()
  assert (directory / "checkpoints" / "2").exists()  # where the next request resumes


# -- command line --------------------------------------------------------------------------


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxt2i", *args], capture_output=True, text=True,
                        timeout=280, cwd=REPO)


@pytest.mark.timeout(300)
def test_cli_scores_a_folder_and_an_npz(tmp_path, quick_evaluator_64):
  del quick_evaluator_64  # makes sure the cached evaluator exists before the subprocesses
  records = [shapes_data.example("test", i, 64) for i in range(12)]
  folder = tmp_path / "images"
  folder.mkdir()
  for i, r in enumerate(records):
    Image.fromarray(r["image"]).save(folder / f"{i:03d}.png")
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(r["caption"] for r in records) + "\n")
  out = tmp_path / "report.json"
  result = _cli("eval", "shapes", "--images", str(folder), "--captions", str(captions),
                "--out", str(out), "--split", "test")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())["test"]
  # (The quick test evaluator's verdicts, not the real one's accuracy: see the slow tests.)
  assert report["num_images"] == 12 and 0.0 <= report["fully_correct"] <= 1.0
  assert set(report["per_attribute"]) == {"color", "shape", "size", "place", "count"}

  # The same images as an .npz, reversed: the same verdicts, reversed.
  npz = tmp_path / "images.npz"
  np.savez(npz, images=np.stack([r["image"] for r in records[::-1]]))
  reversed_captions = tmp_path / "reversed.txt"
  reversed_captions.write_text("\n".join(r["caption"] for r in records[::-1]) + "\n")
  result = _cli("eval", "shapes", "--images", str(npz), "--captions", str(reversed_captions))
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["custom"]["fully_correct"] == report["fully_correct"]

  captions.write_text("\n".join(r["caption"] for r in records[:5]))
  result = _cli("eval", "shapes", "--images", str(npz), "--captions", str(captions))
  assert result.returncode != 0
  assert "12 images but 5 captions" in result.stderr
  assert "Traceback" not in result.stderr
