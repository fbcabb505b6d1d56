"""grain input pipeline: preprocessing, per-host shards, checkpointable order, folder data."""

import numpy as np
import pytest
from PIL import Image

from helpers import records, tiny_config, tokenizer_path
from jaxt2i.data import builders, pipeline
from jaxt2i.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.load(str(tokenizer_path(tmp_path_factory.mktemp("tok"))))


def test_resize_center_crop_keeps_the_centre():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 255  # the central 40x40 square is white, the sides black
  out = pipeline.resize_center_crop(image, 20)
  assert out.shape == (20, 20, 3)
  assert out[:, 1:-1].min() >= 250  # the crop is the white centre (bicubic tails at the rim)
  assert out.min() > 200
  square = image[:, 20:60]
  assert pipeline.resize_center_crop(square, 40) is square  # already the right size: untouched


def test_preprocess_scales_and_tokenizes(tok):
  pre = pipeline.Preprocess(tokenizer=tok, image_size=32, max_caption_length=16,
                            value_range=(-1.0, 1.0))
  record = records()[0]
  out = pre.map(record)
  assert out["image"].dtype == np.float32 and out["image"].shape == (32, 32, 3)
  expected = record["image"].astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(out["image"], expected, atol=1e-6)
  assert tok.decode(out["tokens"][None])[0] == record["caption"]
  assert out["tokens_mask"].sum() == len(record["caption"].split()) + 1  # words + EOS


def _read(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)], it


class Tracking(pipeline.InMemorySource):
  """Remembers which indices were read (grain reads ahead on threads, so per instance)."""

  def __init__(self, items):
    super().__init__(items)
    self.ids = []

  def __getitem__(self, i):
    self.ids.append(int(i))
    return super().__getitem__(i)


def test_hosts_read_disjoint_shards(tok):
  config = tiny_config()
  seen = []
  for host in range(2):
    source = Tracking(records())
    loader = pipeline.make_loader(config.data, global_batch_size=16, seed=0, source=source,
                                  tokenizer=tok, process_index=host, process_count=2)
    batches, _ = _read(loader, 3)
    assert batches[0]["image"].shape[0] == 8  # each host yields its half of the batch
    seen.append(set(source.ids))
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_iterator_state_restores_the_exact_order(tok):
  config = tiny_config()
  loader = pipeline.make_loader(config.data, global_batch_size=16, seed=3, source=records(),
                                tokenizer=tok)
  _, it = _read(loader, 5)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (128 / 16 = 8)
  resumed = iter(loader)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["image"], want["image"])
  # A different seed gives a different order.
  other = pipeline.make_loader(config.data, global_batch_size=16, seed=4, source=records(),
                               tokenizer=tok)
  first, _ = _read(other, 1)
  again, _ = _read(loader, 1)
  assert not np.array_equal(first[0]["tokens"], again[0]["tokens"])


def test_folder_dataset_through_the_loader(tmp_path, tok):
  folder = tmp_path / "pics"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(20):
    h, w = (48, 64) if i % 2 else (64, 40)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text("a small red circle in the top left")
  builders.build("folder", data_dir=tmp_path / "data", path=folder, dataset_name="pics")
  config = tiny_config(**{"data.name": "image_text_folder/pics",
                          "data.data_dir": str(tmp_path / "data"), "data.image_size": 32})
  loader = pipeline.make_loader(config.data, global_batch_size=8, seed=0, tokenizer=tok)
  batch = next(iter(loader))
  assert batch["image"].shape == (8, 32, 32, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_too_small_dataset_is_a_clear_error(tok):
  config = tiny_config()
  with pytest.raises(ValueError, match="too few"):
    pipeline.make_loader(config.data, global_batch_size=16, seed=0, source=records()[:10],
                         tokenizer=tok)
