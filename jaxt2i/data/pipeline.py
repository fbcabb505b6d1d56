"""grain input pipeline: tfds data source -> global record order -> this host's slice ->
preprocess -> batch.

The records form one global sequence: epoch after epoch, each a fresh permutation of the data
set when shuffling (`GlobalOrderSampler`). The sequence is cut into global batches, and host p
of n reads slice p of each, yielding its share as numpy; the trainer assembles the global
array with `jax.make_array_from_process_local_data`. Hosts read disjoint records, and the order
depends only on the seed and the global batch size, never on the number of hosts: a run's data
position is one number (records consumed, = steps x global batch), saved with every checkpoint,
and a loader started there (`make_loader(start=...)`) continues the sequence exactly, on any
number of processes and devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import grain.experimental as grain_experimental
from absl import flags
import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from jaxt2i.data import builders
from jaxt2i.data.tokenizer import CLIPTokenizer, Tokenizer, tokenizer_for_dataset

# Keys every training batch carries.
BATCH_KEYS = ("image", "tokens", "tokens_mask")


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic, area-like when shrinking), then crops."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC,
                                                     reducing_gap=3.0))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.Map):
  """Decodes one record into model inputs: scaled image and tokenized caption.

  Without a tokenizer (tasks that read no text) there are no `tokens`; `features` (a picklable
  function of the record, for grain's worker processes) adds a task's per-record targets.
  """
  tokenizer: Tokenizer | None
  image_size: int
  max_caption_length: int
  value_range: tuple[float, float] = (-1.0, 1.0)
  features: Callable[[Mapping[str, Any]], dict[str, np.ndarray]] | None = None

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    image = resize_center_crop(builders.decode_image(record), self.image_size)
    low, high = self.value_range
    out = {"image": image.astype(np.float32) * ((high - low) / 255.0) + low}
    if self.tokenizer is not None:
      # The tokenizer takes tfds's bytes captions as they are.
      tokens, mask = self.tokenizer.encode([record["caption"]], self.max_caption_length)
      out["tokens"] = tokens[0].astype(np.int32)
      out["tokens_mask"] = mask[0].astype(np.int32)
    if self.features is not None:
      out.update(self.features(record))
    return out


class GlobalOrderSampler:
  """grain sampler of one host's share of a global record sequence.

  Global position g (0, 1, 2, ...) holds record `perm_e(g mod N)` of epoch e = g // N, where
  perm_e is grain's index_shuffle keyed by (seed + e) (the identity without shuffling). Local
  index k of host p (of n, each reading b = B / n per global batch of B) is global position
  `start + (k // b) * B + p * b + k % b`. With `num_epochs`, the sequence ends after the last
  complete global batch. Each record's rng (for random augmentations) follows its global
  position, so it too is independent of the host count.
  """

  def __init__(self, num_records: int, *, global_batch_size: int, process_index: int,
               process_count: int, shuffle: bool, seed: int, num_epochs: int | None = None,
               start: int = 0):
    if num_records < global_batch_size:
      raise ValueError(f"data set has {num_records} records: too few for a global batch of "
                       f"{global_batch_size}")
    if start < 0:
      raise ValueError(f"data start position {start} must be >= 0")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed {seed} must be a 32-bit non-negative integer")
    self.num_records, self.global_batch_size = num_records, global_batch_size
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = global_batch_size // process_count
    self.shuffle, self.seed, self.num_epochs, self.start = shuffle, seed, num_epochs, start
    self._end = None
    if num_epochs is not None:
      total = num_epochs * num_records
      self._end = total - total % global_batch_size

  def __len__(self) -> int:
    if self._end is None:
      return sys.maxsize
    batches = max(self._end - self.start, 0) // self.global_batch_size
    return batches * self.local_batch

  def __repr__(self) -> str:
    return (f"GlobalOrderSampler(num_records={self.num_records}, global_batch_size="
            f"{self.global_batch_size}, process={self.process_index}/{self.process_count}, "
            f"shuffle={self.shuffle}, seed={self.seed}, num_epochs={self.num_epochs}, "
            f"start={self.start})")

  def position(self, index: int) -> int:
    """The global position that local `index` reads."""
    step, offset = divmod(index, self.local_batch)
    return (self.start + step * self.global_batch_size
            + self.process_index * self.local_batch + offset)

  def record_key(self, position: int) -> int:
    epoch, i = divmod(position, self.num_records)
    if not self.shuffle:
      return i
    return int(grain_experimental.index_shuffle(
        i, max_index=self.num_records - 1, seed=(self.seed + epoch) % 2**32, rounds=4))

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    position = self.position(index)
    if index < 0 or (self._end is not None and position >= self._end):
      raise IndexError(f"index {index} (global position {position}) is past the end of "
                       f"{self!r}")
    rng = np.random.Generator(np.random.Philox(key=self.seed + position))
    return grain.RecordMetadata(index=index, record_key=self.record_key(position),
                                       rng=rng)


class InMemorySource:
  """A list of records as a grain source. grain stores `repr(source)` in the checkpoint and
  compares it on restore, so the repr is short and stable rather than the records' text."""

  def __init__(self, records: Sequence[Mapping[str, Any]], name: str = "in-memory"):
    self.records, self.name = records, name

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    return self.records[index]

  def __repr__(self) -> str:
    return f"InMemorySource({self.name!r}, {len(self.records)} records)"


# A training run's copy of its tokenizer, in its workdir.
TOKENIZER_FILE = "tokenizer.model"


CLIP_TOKENIZER_DIR = "clip_tokenizer"


def save_run_tokenizer(tokenizer: Tokenizer | CLIPTokenizer, workdir: Any) -> None:
  """Keeps the run's own copy of its tokenizer in `workdir` (sampling then needs neither the
  data nor the folder it came from): tokenizer.model, or CLIP's files in clip_tokenizer/."""
  workdir = epath.Path(workdir)
  if isinstance(tokenizer, CLIPTokenizer):
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer.save(tmp)
      (workdir / CLIP_TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
      for name in os.listdir(tmp):
        (workdir / CLIP_TOKENIZER_DIR / name).write_bytes(
            epath.Path(tmp, name).read_bytes())
  else:
    (workdir / TOKENIZER_FILE).write_bytes(tokenizer.model_proto)


def _load_clip_tokenizer(folder: epath.Path) -> CLIPTokenizer:
  if os.path.isdir(str(folder)):
    return CLIPTokenizer.load(str(folder))
  with tempfile.TemporaryDirectory() as tmp:  # e.g. a run on GCS: transformers reads files
    for item in folder.iterdir():
      epath.Path(tmp, item.name).write_bytes(item.read_bytes())
    return CLIPTokenizer.load(tmp)


def load_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: Any = None
                   ) -> Tokenizer | CLIPTokenizer:
  """The run's own copy (workdir/tokenizer.model or workdir/clip_tokenizer/) when there is
  one, else data.tokenizer (a sentencepiece model file, or a folder with CLIP's files), else
  the one trained on (and cached for) the data set's captions."""
  if workdir is not None and (epath.Path(workdir) / TOKENIZER_FILE).exists():
    path = epath.Path(workdir) / TOKENIZER_FILE
    return Tokenizer(path.read_bytes(), path=str(path))
  if workdir is not None and (epath.Path(workdir) / CLIP_TOKENIZER_DIR).is_dir():
    return _load_clip_tokenizer(epath.Path(workdir) / CLIP_TOKENIZER_DIR)
  if data_cfg.tokenizer:
    if epath.Path(data_cfg.tokenizer).is_dir():
      return CLIPTokenizer.load(data_cfg.tokenizer)
    return Tokenizer.load(data_cfg.tokenizer)
  return tokenizer_for_dataset(data_cfg.name, data_dir=data_cfg.data_dir or None,
                               vocab_size=data_cfg.vocab_size)


def make_loader(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    split: str | None = None,
    source: Sequence[Mapping[str, Any]] | None = None,
    tokenizer: Tokenizer | None = None,
    shuffle: bool | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start: int = 0,
    text: bool = True,
    features: Callable[[Mapping[str, Any]], dict[str, np.ndarray]] | None = None,
) -> grain.DataLoader:
  """A grain DataLoader yielding this host's share of each global batch.

  `source` overrides the tfds source (any object with __len__ and __getitem__ returning
  records like the builders'). `num_epochs=None` repeats forever (training). `start` is the
  global record position to begin at (a resumed run's checkpointed data position). `text=False`
  skips the tokenizer (no `tokens` in the batch); `features` adds per-record arrays.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} hosts")
  if source is None:
    source = builders.data_source(data_cfg.name, split or data_cfg.split,
                                  data_dir=data_cfg.data_dir or None)
  elif isinstance(source, (list, tuple)):
    source = InMemorySource(source)
  if not text:
    tokenizer = None
  else:
    tokenizer = tokenizer or load_tokenizer(data_cfg)
  if tokenizer is not None and tokenizer.vocab_size > data_cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but config.data.vocab_size="
                     f"{data_cfg.vocab_size}; raise config.data.vocab_size")
  local_batch = global_batch_size // process_count
  if len(source) < global_batch_size:
    raise ValueError(f"data set {data_cfg.name!r} has {len(source)} records: too few for "
                     f"{process_count} host(s) x batch {local_batch}")
  sampler = GlobalOrderSampler(
      len(source), global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, shuffle=data_cfg.shuffle if shuffle is None else shuffle,
      seed=seed, num_epochs=num_epochs, start=start)
  ops = [
      Preprocess(tokenizer=tokenizer, image_size=data_cfg.image_size,
                 max_caption_length=data_cfg.max_caption_length,
                 value_range=tuple(data_cfg.value_range), features=features),
      grain.transforms.Batch(batch_size=local_batch, drop_remainder=True),
  ]
  if data_cfg.worker_count > 0 and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside an absl app (notebooks, scripts)
    # they would fail with UnparsedFlagAccessError, so accept the defaults.
    flags.FLAGS.mark_as_parsed()
  logging.info("data: %s[%s] %d records, host %d/%d reads %d per step%s", data_cfg.name,
               split or data_cfg.split, len(source), process_index, process_count, local_batch,
               f" from position {start}" if start else "")
  # The sampler already yields only this host's records, so grain must not shard again.
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          shard_options=grain.sharding.NoSharding(),
                          worker_count=data_cfg.worker_count,
                          worker_buffer_size=data_cfg.worker_buffer_size)
