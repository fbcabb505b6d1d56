"""sentencepiece tokenizer: training, encode/decode contract, pickling, per-data-set cache."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest

from jaxt2i.data import builders, shapes, tokenizer
from jaxt2i.data.tokenizer import Tokenizer, train_tokenizer

MAX_LEN = 20  # the longest shapes-v1 caption is 16 pieces or fewer, plus EOS


def _captions(split: str, n: int) -> list[str]:
  # Captions do not depend on the image size; 8 px keeps rendering cheap.
  return [r["caption"] for r in shapes.generate(split, n, image_size=8)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "shapes.model"
  return train_tokenizer(_captions("train", 400), path, vocab_size=64), path


def test_special_ids_and_file(trained):
  tok, path = trained
  assert path.is_file() and tok.path == str(path)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert 8 < tok.vocab_size <= 64
  assert Tokenizer.load(path).model_proto == path.read_bytes() == tok.model_proto


def test_round_trips_every_split_exactly(trained):
  tok, _ = trained
  captions = _captions("train", 50) + _captions("test", 50) + _captions("test_heldout", 50)
  ids, mask = tok.encode(captions, MAX_LEN)
  assert tok.decode(ids) == captions
  assert mask.sum(axis=1).max() < MAX_LEN  # nothing was truncated
  # Every shapes-v1 word is one piece, so the longest caption (16 words) fits 20 with EOS.
  assert [int(m.sum()) - 1 for m in mask] == [len(c.split()) for c in captions]


def test_encode_appends_eos_pads_and_masks(trained):
  tok, _ = trained
  texts = ["a small red circle in the top left", "a large blue square above a small yellow "
           "triangle"]
  ids, mask = tok.encode(texts, MAX_LEN)
  assert ids.shape == mask.shape == (2, MAX_LEN)
  assert ids.dtype == np.int32 and mask.dtype == bool
  for row, text in enumerate(texts):
    pieces = tok.processor.encode(text)
    n = len(pieces)
    assert ids[row, :n].tolist() == pieces
    assert ids[row, n] == tok.eos_id
    assert (ids[row, n + 1:] == tok.pad_id).all()
    assert mask[row].tolist() == [True] * (n + 1) + [False] * (MAX_LEN - n - 1)
    assert tok.eos_id not in pieces and tok.pad_id not in pieces
  empty_ids, empty_mask = tok.encode([], MAX_LEN)
  assert empty_ids.shape == empty_mask.shape == (0, MAX_LEN)
  with pytest.raises(TypeError, match="sequence of texts"):
    tok.encode("a small red circle", MAX_LEN)


def test_truncation_keeps_eos_and_warns_with_count(trained, caplog):
  tok = Tokenizer(trained[0].model_proto)  # fresh running count
  long = "a large blue square above a small yellow triangle"
  with caplog.at_level(logging.WARNING, logger=tokenizer.__name__):
    ids, mask = tok.encode([long, "a", long], 4)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "truncated 2 of 3 texts to max_length=4" in warnings[0]
  assert ids[0, 3] == ids[2, 3] == tok.eos_id and mask[0].all()
  assert ids[0, :3].tolist() == tok.processor.encode(long)[:3]
  assert long.startswith(tok.decode(ids[0])[0])
  assert mask[1].tolist() == [True, True, False, False]
  # Per-record callers would log every long caption; warnings come at powers of two.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=tokenizer.__name__):
    tok.encode([long], 4)  # 3 so far: quiet
    assert not caplog.records
    tok.encode([long], 4)  # 4 so far: warns
  assert len(caplog.records) == 1 and "4 truncated so far" in caplog.records[0].getMessage()


def test_decode_stops_at_eos_or_pad_and_tolerates_wide_vocab(trained):
  tok, _ = trained
  (piece,) = tok.processor.encode("circle")
  rows = np.array([[tok.bos_id, piece, tok.eos_id, piece],
                   [piece, tok.pad_id, piece, piece],
                   [piece, tok.vocab_size + 5, tok.eos_id, 0]])
  assert tok.decode(rows)[:2] == ["circle", "circle"]
  assert tok.decode(rows)[2].startswith("circle") and "⁇" in tok.decode(rows)[2]
  assert tok.decode(rows[0]) == ["circle"]


def test_pickles_without_the_processor(trained):
  tok, _ = trained
  tok.encode(["a small red circle"], 8)  # make sure the processor exists before pickling
  blob = pickle.dumps(tok)
  assert len(blob) < len(tok.model_proto) + 4096
  restored = pickle.loads(blob)
  texts = _captions("test", 5)
  for a, b in zip(restored.encode(texts, MAX_LEN), tok.encode(texts, MAX_LEN)):
    np.testing.assert_array_equal(a, b)
  assert restored.vocab_size == tok.vocab_size and restored.path == tok.path


def test_training_is_deterministic_and_vocab_is_an_upper_bound(tmp_path):
  texts = _captions("train", 200)
  a = train_tokenizer(texts, tmp_path / "a.model", vocab_size=2000)
  b = train_tokenizer(iter(texts), tmp_path / "b.model", vocab_size=2000)
  assert a.model_proto == b.model_proto
  assert a.vocab_size < 2000  # hard_vocab_limit=False: fewer pieces than asked is fine
  assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporaries
  with pytest.raises(ValueError, match="model_type"):
    train_tokenizer(texts, None, vocab_size=64, model_type="wordpiece")
  with pytest.raises(ValueError, match="no non-empty texts"):
    train_tokenizer(["", "  "], None, vocab_size=64)


def test_lowercasing_only_when_asked(tmp_path):
  texts = ["A Red Circle", "a blue Square"] * 20
  cased = train_tokenizer(texts, None, vocab_size=40)
  assert cased.decode(cased.encode(["A Red Circle"], 10)[0]) == ["A Red Circle"]
  lower = train_tokenizer(texts, None, vocab_size=40, lowercase=True)
  assert lower.decode(lower.encode(["A Red Circle"], 10)[0]) == ["a red circle"]


def test_dataset_tokenizer_is_cached_not_retrained(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="jaxt2i data build shapes --variant tiny"):
    tokenizer.tokenizer_for_dataset("shapes_v1/tiny", data_dir=tmp_path, vocab_size=64)
  builders.build("shapes", data_dir=str(tmp_path), variant="tiny")
  first = tokenizer.tokenizer_for_dataset("shapes_v1/tiny", data_dir=tmp_path, vocab_size=64)
  path = tmp_path / "tokenizers" / "shapes_v1_tiny-64.model"
  assert first.path == str(path) and path.is_file()
  held_out = _captions("test_heldout", 20)
  assert first.decode(first.encode(held_out, MAX_LEN)[0]) == held_out
  mtime = path.stat().st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("retrained a cached tokenizer")

  monkeypatch.setattr(tokenizer, "train_tokenizer", no_training)
  second = tokenizer.tokenizer_for_dataset("shapes_v1/tiny", data_dir=tmp_path, vocab_size=64)
  assert second.model_proto == first.model_proto and path.stat().st_mtime_ns == mtime
  with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another model
    tokenizer.tokenizer_for_dataset("shapes_v1/tiny", data_dir=tmp_path, vocab_size=32)


def test_load_missing_model_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    Tokenizer.load(tmp_path / "none.model")
