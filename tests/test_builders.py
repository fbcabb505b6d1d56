"""tfds builders: shapes-v1 variants, image+caption folders, data sources and their errors."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxt2i.data import builders, shapes

TINY = {"train": 512, "test": 64, "test_heldout": 64}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  return data_dir, builders.build("shapes", data_dir=str(data_dir), variant="tiny")


def test_shapes_tiny_builds_three_readable_splits(tiny):
  data_dir, summary = tiny
  assert summary["dataset"] == "shapes_v1/tiny"
  assert summary["splits"] == TINY and summary["reused"] is False
  assert Path(summary["path"]) == data_dir / "shapes_v1" / "tiny" / "1.0.0"
  for split, n in TINY.items():
    source = builders.data_source("shapes_v1/tiny", split, data_dir=data_dir)
    assert len(source) == n
    record = source[n - 1]
    assert record["image"].dtype == np.uint8 and record["image"].shape == (32, 32, 3)
    caption = _text(record["caption"])
    parsed = shapes.parse_caption(caption)  # raises unless it is a shapes-v1 caption
    assert len(parsed.objects) == record["num_objects"] == len(record["objects"]["color"])
    image = builders.decode_image(record)
    assert image.shape == (32, 32, 3) and image.max() > 0


def test_shapes_record_i_is_generator_example_i(tiny):
  data_dir, _ = tiny
  for split in shapes.SPLITS:
    source = builders.data_source("shapes_v1/tiny", split, data_dir=data_dir)
    for i in (0, 1, 37):
      want, got = shapes.example(split, i, image_size=32), source[i]
      np.testing.assert_array_equal(got["image"], want["image"])
      assert _text(got["caption"]) == want["caption"]
      assert _text(got["position"]) == want["position"]
      assert _text(got["relation"]) == want["relation"]
      assert [_text(c) for c in got["objects"]["shape"]] == want["objects"]["shape"]
      np.testing.assert_allclose(got["objects"]["x"], want["objects"]["x"], atol=1e-6)


def _pairs(record) -> set[tuple[str, str]]:
  return {(_text(c), _text(s)) for c, s in zip(record["objects"]["color"],
                                               record["objects"]["shape"])}


def test_heldout_pairs_absent_from_train_and_present_in_test_heldout(tiny):
  data_dir, _ = tiny
  train = builders.data_source("shapes_v1/tiny", "train", data_dir=data_dir)
  assert not any(_pairs(train[i]) & shapes.HELDOUT_PAIRS for i in range(len(train)))
  heldout = builders.data_source("shapes_v1/tiny", "test_heldout", data_dir=data_dir)
  assert all(_pairs(heldout[i]) & shapes.HELDOUT_PAIRS for i in range(len(heldout)))
  test = builders.data_source("shapes_v1/tiny", "test", data_dir=data_dir)
  assert {len(_pairs(test[i])) for i in range(len(test))} == {1, 2}


def test_rebuild_is_a_noop(tiny):
  data_dir, first = tiny
  files = sorted(Path(first["path"]).iterdir())
  mtimes = [f.stat().st_mtime_ns for f in files]
  again = builders.build("shapes", data_dir=str(data_dir), variant="tiny")
  assert again["reused"] is True and "reused" in again["status"]
  assert again["splits"] == TINY and again["path"] == first["path"]
  assert sorted(Path(first["path"]).iterdir()) == files
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_parallel_build_writes_the_same_records(tiny, tmp_path):
  data_dir, _ = tiny
  builders.build("shapes", data_dir=str(tmp_path), variant="tiny", num_workers=2)
  for split in shapes.SPLITS:
    serial = builders.data_source("shapes_v1/tiny", split, data_dir=data_dir)
    parallel = builders.data_source("shapes_v1/tiny", split, data_dir=tmp_path)
    assert len(parallel) == len(serial)
    for i in range(0, len(serial), 7):
      np.testing.assert_array_equal(parallel[i]["image"], serial[i]["image"])
      assert parallel[i]["caption"] == serial[i]["caption"]


def test_data_source_pickles_for_grain_workers(tiny):
  data_dir, _ = tiny
  source = builders.data_source("shapes_v1/tiny", "test[:10]", data_dir=data_dir)
  restored = pickle.loads(pickle.dumps(source))
  assert len(restored) == len(source) == 10
  np.testing.assert_array_equal(restored[9]["image"], source[9]["image"])


def test_data_source_errors(tiny, tmp_path):
  data_dir, _ = tiny
  with pytest.raises(ValueError, match=r"not built .*`jaxt2i data build shapes --variant 64"):
    builders.data_source("shapes_v1/64", "train", data_dir=data_dir)
  with pytest.raises(ValueError, match=r"jaxt2i data build folder --path DIR --dataset_name pets"):
    builders.data_source("image_text_folder/pets", "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match=r"no split 'validation'.*'train', 'test', 'test_heldout'"):
    builders.data_source("shapes_v1/tiny", "validation", data_dir=data_dir)
  # Named without its config, a data set lists the configs that are built.
  (tmp_path / "multi" / "small" / "1.0.0").mkdir(parents=True)
  (tmp_path / "multi" / "small" / "1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(ValueError, match=r"configs \['multi/small'\]"):
    builders.data_source("multi", "train", data_dir=tmp_path)


def test_build_rejects_unknown_names_and_options(tmp_path):
  with pytest.raises(ValueError, match=r"unknown data set 'digits'.*'shapes', 'folder'"):
    builders.build("digits", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown shapes variant '48'.*'tiny'"):
    builders.build("shapes", data_dir=str(tmp_path), variant="48")
  with pytest.raises(ValueError, match=r"unknown options \['size'\]"):
    builders.build("shapes", data_dir=str(tmp_path), size=64)
  assert not (tmp_path / "shapes_v1").exists()


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXT2I_DATA_DIR", str(tmp_path))
  assert builders.default_data_dir() == str(tmp_path)
  monkeypatch.delenv("JAXT2I_DATA_DIR")
  assert builders.default_data_dir() == os.path.expanduser("~/.cache/jaxt2i/data")


def test_decode_image_handles_pixels_and_encoded_bytes():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  np.testing.assert_array_equal(builders.decode_image({"image": pixels}), pixels)
  np.testing.assert_array_equal(builders.decode_image({"image": buf.getvalue()}), pixels)
  np.testing.assert_array_equal(
      builders.decode_image({"image": np.array(buf.getvalue(), dtype=object)}), pixels)
  gray = builders.decode_image({"image": pixels[..., :1]})
  assert gray.shape == (5, 7, 3) and (gray == pixels[..., :1]).all()
  with pytest.raises(ValueError, match="uint8"):
    builders.decode_image({"image": pixels.astype(np.float32)})


# ---------------------------------------------------------------------------------------------
# image + caption folders


def _image(path: Path, seed: int, size=(12, 9), mode="RGB", **save) -> np.ndarray:
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4}[mode]
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels, mode).save(path, **save)
  return pixels


def _write(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


@pytest.fixture
def messy_folder(tmp_path):
  root = tmp_path / "pets"
  train, test = root / "train", root / "test"
  good = {"train/cat.png": _image(train / "cat.png", 0)}
  _write(train / "cat.txt", "a grey cat on a sofa\n")
  _image(train / "dog.jpg", 1, quality=90)
  good["train/dog.jpg"] = np.asarray(Image.open(train / "dog.jpg").convert("RGB"))
  _write(train / "dog.txt", "a dog")
  good["train/deep/owl.PNG"] = _image(train / "deep" / "owl.PNG", 2)
  _write(train / "deep" / "owl.txt", "an owl")
  _image(train / "cut.png", 3, size=(64, 64))
  data = (train / "cut.png").read_bytes()
  (train / "cut.png").write_bytes(data[:len(data) // 2])  # truncated
  _write(train / "cut.txt", "half an image")
  _write(train / "fake.png", "this is not a png")
  _write(train / "fake.txt", "a lie")
  _image(train / "nocap.png", 4)
  _image(train / "latin1.png", 11)
  (train / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
  _image(train / "blank.png", 5)
  _write(train / "blank.txt", "  \n")
  _image(train / ".hidden.png", 6)  # ignored, like macOS metadata files
  _write(train / "notes.md", "not data")
  good["test/a.png"] = _image(test / "a.png", 7)
  _image(test / "b.bmp", 8)
  good["test/b.bmp"] = np.asarray(Image.open(test / "b.bmp"))
  _image(test / "unlisted.png", 9)
  _write(test / "captions.jsonl", "\n".join([
      json.dumps({"file": "a.png", "caption": "first"}),
      json.dumps({"image": "b.bmp", "text": "second"}),
      "{not json",
      json.dumps({"file": "gone.png", "caption": "missing"}),
      "",
      json.dumps(["a.png", "a list, not an object"]),
  ]))
  _write(root / "validation" / "broken.png", "garbage")
  _write(root / "validation" / "broken.txt", "a broken image")
  _image(root / "stray.png", 10)
  return root, good


def test_folder_build_skips_and_reports_bad_files(messy_folder, tmp_path, capsys):
  root, good = messy_folder
  summary = builders.build("folder", data_dir=str(tmp_path / "data"), path=str(root),
                           dataset_name="pets")
  report = summary["report"]
  assert report == json.loads(Path(summary["report_path"]).read_text())
  assert Path(summary["report_path"]).parent == Path(summary["path"])
  assert report["examples"] == {"train": 3, "test": 2} == summary["splits"]
  assert report["layout"] == {"train": "pairs", "test": "jsonl", "validation": "pairs"}
  assert report["empty_splits"] == ["validation"]
  assert report["skipped"] == {
      "unreadable_image": 3, "missing_caption": 2, "empty_caption": 1, "unreadable_caption": 1,
      "bad_jsonl_line": 2, "missing_file": 1, "outside_split_folders": 1}
  assert report["num_skipped"] == 11
  files = report["skipped_files"]
  assert sorted(files["unreadable_image"]) == ["train/cut.png", "train/fake.png",
                                               "validation/broken.png"]
  assert sorted(files["missing_caption"]) == ["test/unlisted.png", "train/nocap.png"]
  assert files["empty_caption"] == ["train/blank.png"]
  assert files["unreadable_caption"] == ["train/latin1.txt"]
  assert files["bad_jsonl_line"] == ["test/captions.jsonl:3", "test/captions.jsonl:6"]
  assert files["missing_file"] == ["test/captions.jsonl:4: gone.png"]
  assert files["outside_split_folders"] == ["stray.png"]
  printed = [l for l in capsys.readouterr().out.splitlines()
             if l.startswith("image_text_folder/pets:")]
  assert len(printed) == 1 and "5 examples (train 3, test 2)" in printed[0]
  assert "skipped 11 (unreadable_image 3, missing_caption 2," in printed[0]

  read = {}
  for split in ("train", "test"):
    source = builders.data_source("image_text_folder/pets", split, data_dir=tmp_path / "data")
    for i in range(len(source)):
      record = source[i]
      image = builders.decode_image(record)
      assert (record["height"], record["width"]) == image.shape[:2]
      read[_text(record["filename"])] = (image, _text(record["caption"]))
  assert sorted(read) == sorted(good)
  for name, pixels in good.items():
    np.testing.assert_array_equal(read[name][0], pixels)  # lossless after decoding
  assert read["train/cat.png"][1] == "a grey cat on a sofa"
  assert read["test/b.bmp"][1] == "second"


def test_folder_without_split_folders_is_train(tmp_path):
  root = tmp_path / "flat"
  _image(root / "x.png", 0)
  _write(root / "x.txt", "an x")
  rgba = _image(root / "y.png", 1, mode="RGBA")
  rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
  Image.fromarray(rgba, "RGBA").save(root / "y.png")
  _write(root / "y.txt", "a y")
  summary = builders.build("folder", data_dir=str(tmp_path / "data"), path=str(root))
  assert summary["dataset"] == "image_text_folder/flat"  # named after the folder
  assert summary["splits"] == {"train": 2} and summary["report"]["num_skipped"] == 0
  source = builders.data_source("image_text_folder/flat", "train", data_dir=tmp_path / "data")
  y = builders.decode_image(source[1])
  assert _text(source[1]["filename"]) == "y.png"
  np.testing.assert_array_equal(y[0, 0], [255, 255, 255])  # transparent -> white
  np.testing.assert_array_equal(y[0, 1], rgba[0, 1, :3])  # opaque kept


def test_folder_rebuild_reuses_and_flags_a_changed_folder(tmp_path, capsys):
  root = tmp_path / "few"
  _image(root / "a.png", 0)
  _write(root / "a.txt", "a")
  first = builders.build("folder", data_dir=str(tmp_path / "data"), path=str(root),
                         dataset_name="few")
  capsys.readouterr()
  again = builders.build("folder", data_dir=str(tmp_path / "data"), path=str(root),
                         dataset_name="few")
  assert again["reused"] is True and "stale" not in again
  assert again["report"] == first["report"]
  assert "image_text_folder/few:" not in capsys.readouterr().out  # nothing rebuilt
  _image(root / "b.png", 1)
  _write(root / "b.txt", "b")
  stale = builders.build("folder", data_dir=str(tmp_path / "data"), path=str(root),
                         dataset_name="few")
  assert stale["reused"] is True and stale["stale"] is True and stale["splits"] == {"train": 1}
  fresh = builders.build("folder", data_dir=str(tmp_path / "data"), path=str(root),
                         dataset_name="few", overwrite=True)
  assert fresh["reused"] is False and fresh["splits"] == {"train": 2}


def test_folder_errors_name_the_path(tmp_path):
  data = str(tmp_path / "data")
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError, match=f"{missing} does not exist"):
    builders.build("folder", data_dir=data, path=str(missing), dataset_name="x")
  empty = tmp_path / "empty"
  _write(empty / "readme.txt", "no images here")
  with pytest.raises(ValueError, match=f"{empty} has no images .* and no captions.jsonl"):
    builders.build("folder", data_dir=data, path=str(empty), dataset_name="x")
  bad = tmp_path / "bad"
  _write(bad / "a.png", "not an image")
  _write(bad / "a.txt", "caption")
  _image(bad / "b.png", 0)
  with pytest.raises(ValueError, match=f"every example in image folder {bad} was skipped"):
    builders.build("folder", data_dir=data, path=str(bad), dataset_name="bad")
  # Nothing half-built is left behind to be "reused" once the folder is fixed.
  with pytest.raises(ValueError, match="not built"):
    builders.data_source("image_text_folder/bad", "train", data_dir=data)
  _write(bad / "b.txt", "now captioned")
  assert builders.build("folder", data_dir=data, path=str(bad),
                        dataset_name="bad")["splits"] == {"train": 1}
  with pytest.raises(ValueError, match="dataset_name"):
    builders.build("folder", data_dir=data, path=str(bad), dataset_name="no/slashes")
