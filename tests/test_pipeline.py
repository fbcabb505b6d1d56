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


def _record_id(record):
  return {"id": np.int32(record["id"])}


def test_hosts_read_disjoint_slices_of_the_global_batches(tok):
  config = tiny_config()
  source = [dict(r, id=i) for i, r in enumerate(records())]
  read = lambda host, hosts: _read(pipeline.make_loader(
      config.data, global_batch_size=16, seed=0, source=source, tokenizer=tok,
      process_index=host, process_count=hosts, features=_record_id), 10)[0]
  single = read(0, 1)
  halves = [read(host, 2) for host in range(2)]
  assert halves[0][0]["image"].shape[0] == 8  # each host yields its half of the batch
  for step in range(10):  # crosses the epoch boundary (128 / 16 = 8)
    ids = [h[step]["id"] for h in halves]
    assert not set(ids[0]) & set(ids[1])
    np.testing.assert_array_equal(np.concatenate(ids), single[step]["id"])
    np.testing.assert_array_equal(halves[1][step]["image"], single[step]["image"][8:])
  first_epoch = np.concatenate([b["id"] for b in single[:8]])
  assert sorted(first_epoch) == list(range(128))


def test_start_position_continues_the_exact_order(tok):
  config = tiny_config()
  loader = pipeline.make_loader(config.data, global_batch_size=16, seed=3, source=records(),
                                tokenizer=tok)
  batches, _ = _read(loader, 9)  # crosses the epoch boundary (128 / 16 = 8)
  resumed = pipeline.make_loader(config.data, global_batch_size=16, seed=3, source=records(),
                                 tokenizer=tok, start=5 * 16)
  again, _ = _read(resumed, 4)
  for want, got in zip(batches[5:], again):
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["image"], want["image"])
  # A different seed gives a different order.
  other = pipeline.make_loader(config.data, global_batch_size=16, seed=4, source=records(),
                               tokenizer=tok)
  first, _ = _read(other, 1)
  assert not np.array_equal(first[0]["tokens"], batches[0]["tokens"])


def test_global_order_is_independent_of_the_host_count():
  n, batch = 40, 8
  keys = lambda s: [s[i].record_key for i in range(len(s))]
  one = pipeline.GlobalOrderSampler(n, global_batch_size=batch, process_index=0, process_count=1,
                                    shuffle=True, seed=7, num_epochs=3)
  order = keys(one)
  assert len(order) == 3 * n
  epochs = [order[e * n:(e + 1) * n] for e in range(3)]
  assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch sees every record once
  assert epochs[0] != epochs[1] and epochs[0] != list(range(n))  # reshuffled every epoch
  for hosts in (2, 4):
    shares = [keys(pipeline.GlobalOrderSampler(
        n, global_batch_size=batch, process_index=p, process_count=hosts, shuffle=True, seed=7,
        num_epochs=3)) for p in range(hosts)]
    local = batch // hosts
    merged = [k for step in range(len(order) // batch)
              for share in shares for k in share[step * local:(step + 1) * local]]
    assert merged == order, hosts
  late = pipeline.GlobalOrderSampler(n, global_batch_size=batch, process_index=1,
                                     process_count=2, shuffle=True, seed=7, num_epochs=3,
                                     start=5 * batch)
  assert keys(late)[:4] == order[5 * batch + 4:5 * batch + 8]
  # The last incomplete global batch is dropped: 3 x 42 = 126 records make 15 batches of 8.
  odd = pipeline.GlobalOrderSampler(42, global_batch_size=batch, process_index=0,
                                    process_count=1, shuffle=False, seed=0, num_epochs=3)
  assert len(odd) == 15 * batch and keys(odd)[:3] == [0, 1, 2]


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
