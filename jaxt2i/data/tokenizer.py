"""Caption tokenizer: sentencepiece models trained on a data set's captions.

Every model this module trains uses the same special ids (pad 0, unk 1, bos 2, eos 3), so a
padded id matrix is the same thing across data sets. `encode` returns fixed-length id and mask
matrices with EOS appended; `tokenizer_for_dataset` trains one on first use and caches it next to
the data (`{data_dir}/tokenizers/`), so every host and every run of a recipe shares one model.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe", "word", "char")
_MAX_PIECE_CHARS = 16  # sentencepiece's default max_sentencepiece_length
_MAX_TRAINING_TEXTS = 2_000_000  # more captions than this change the pieces little

log = logging.getLogger(__name__)


class Tokenizer:
  """A sentencepiece model that can cross process boundaries.

  It holds the serialized model proto, not the C++ processor, so pickling (grain sends the
  preprocessing op to its worker processes) costs one copy of the proto and no file access; the
  processor is rebuilt lazily on first use in each process.
  """

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._proto = bytes(model_proto)
    self.path = path  # where the model was loaded from or written to, if anywhere
    self._sp: spm.SentencePieceProcessor | None = None
    self._truncated = 0  # running count, to keep truncation warnings rare in per-record use
    sp = self.processor
    if sp.pad_id() < 0 or sp.eos_id() < 0:
      raise ValueError(f"sentencepiece model {path or '<bytes>'} has no pad or eos piece "
                       f"(pad_id={sp.pad_id()}, eos_id={sp.eos_id()}); train one with "
                       "jaxt2i.data.tokenizer.train_tokenizer")

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
      raise ValueError(f"tokenizer model {path} does not exist")
    return cls(path.read_bytes(), path=str(path))

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    return self._sp

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sp"] = None  # the C++ processor does not pickle
    return state

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self.processor.pad_id()

  @property
  def unk_id(self) -> int:
    return self.processor.unk_id()

  @property
  def bos_id(self) -> int:
    return self.processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self.processor.eos_id()

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [B, max_length], mask bool [B, max_length]).

    Each row is the text's pieces, then EOS, then padding. A text that does not fit keeps its
    first `max_length - 1` pieces and still ends in EOS, so every row has exactly one EOS (models
    that pool at EOS rely on it).
    """
    if isinstance(texts, (str, bytes)):
      raise TypeError("encode takes a sequence of texts; wrap a single text in a list")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    if len(texts) >= 256:
      pieces = self.processor.encode(texts)  # worth sentencepiece's thread pool
    else:
      # The pipeline encodes one caption per record: the list API's thread-pool set-up costs
      # ~70 us a call against ~3 us for encoding the string itself.
      pieces = [self.processor.encode(t) for t in texts]
    ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=bool)
    truncated = 0
    for row, seq in enumerate(pieces):
      if len(seq) + 1 > max_length:
        truncated += 1
        seq = seq[:max_length - 1]
      ids[row, :len(seq)] = seq
      ids[row, len(seq)] = self.eos_id
      mask[row, :len(seq) + 1] = True
    if truncated:
      before, self._truncated = self._truncated, self._truncated + truncated
      # Per-record callers (the input pipeline) would otherwise log once per long caption;
      # warning when the running total passes a power of two keeps the count visible.
      if self._truncated.bit_length() > before.bit_length():
        log.warning("tokenizer: truncated %d of %d texts to max_length=%d tokens (EOS kept); "
                    "%d truncated so far. Raise max_caption_length to keep whole captions.",
                    truncated, len(texts), max_length, self._truncated)
    return ids, mask

  def decode(self, ids) -> list[str]:
    """Id rows ([B, L] or one [L] row) -> texts, each cut at its first EOS or pad."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"decode takes [B, L] or [L] ids, got shape {ids.shape}")
    stop, skip = {self.eos_id, self.pad_id}, {self.bos_id}
    texts = []
    for row in ids.tolist():
      kept = []
      for i in row:
        if i in stop:
          break
        if i in skip:
          continue
        # Ids past the vocabulary can come from a model whose output layer is wider than the
        # tokenizer (config vocab_size is an upper bound); show them as unknown.
        kept.append(i if 0 <= i < self.vocab_size else self.unk_id)
      texts.append(self.processor.decode(kept))
    return texts


def _atomic_write(path: Path, data: bytes) -> None:
  """Write-then-rename, so concurrent trainers (several hosts) never expose a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def train_tokenizer(texts: Iterable[str], output_path: str | os.PathLike | None,
                    vocab_size: int, model_type: str = "unigram", *,
                    lowercase: bool = False, character_coverage: float = 0.9995,
                    max_sentences: int = _MAX_TRAINING_TEXTS) -> Tokenizer:
  """Trains a sentencepiece model on `texts` and writes it to `output_path` (if given).

  `vocab_size` is an upper bound: small caption languages (shapes-v1 has about 30 words) have
  fewer useful pieces than asked for, and sentencepiece would otherwise refuse to train.
  The same texts always give the same model bytes (one thread, a fixed sampling seed).
  Corpora of more than `max_sentences` texts are subsampled.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  if vocab_size <= EOS_ID + 1:
    raise ValueError(f"vocab_size must be > {EOS_ID + 1} (4 ids are special), got {vocab_size}")
  count = 0

  def sentences() -> Iterator[str]:
    nonlocal count
    words = set()
    for t in texts:
      t = t.decode("utf-8") if isinstance(t, bytes) else str(t)
      if t.strip():
        count += 1
        # Longer words cannot be pieces (max_sentencepiece_length), and unspaced scripts
        # would otherwise repeat whole captions.
        words.update(w for w in t.split() if len(w) <= _MAX_PIECE_CHARS)
        yield t
    # The unigram trainer seeds its vocabulary with maximal repeats: substrings seen with at
    # least two different next (and previous) characters. In templated captions like shapes-v1's
    # a word is always followed by a space ("small") or always ends the caption ("center"), so
    # it never becomes a candidate piece and is spelled out in letters. Showing each distinct
    # word once alone and once followed by a space makes every word a candidate; on natural
    # text two extra occurrences per word barely move the counts.
    if model_type == "unigram":
      words = sorted(words)
      yield from words
      for i in range(0, len(words), 64):
        chunk = words[i:i + 64]
        yield " ".join(chunk + chunk[:1])

  buf = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        hard_vocab_limit=False, character_coverage=character_coverage,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentencepiece_length=_MAX_PIECE_CHARS, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2)
  except RuntimeError as e:
    if count == 0:
      raise ValueError("train_tokenizer got no non-empty texts") from e
    raise
  tokenizer = Tokenizer(buf.getvalue())
  if output_path is not None:
    output_path = Path(output_path)
    _atomic_write(output_path, tokenizer.model_proto)
    tokenizer.path = str(output_path)
  log.info("tokenizer: trained %s model with %d pieces on %d texts -> %s", model_type,
           tokenizer.vocab_size, count, output_path)
  return tokenizer


def cache_path(name: str, data_dir: str | os.PathLike | None, vocab_size: int,
               model_type: str = "unigram") -> Path:
  """Where `tokenizer_for_dataset` keeps the model for data set `name`."""
  from jaxt2i.data import builders
  data_dir = Path(data_dir) if data_dir else Path(builders.default_data_dir())
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"
  kind = "" if model_type == "unigram" else f"-{model_type}"
  return data_dir / "tokenizers" / f"{safe}-{vocab_size}{kind}.model"


def _captions(source, limit: int) -> Iterator[str]:
  """Captions of up to `limit` records spread evenly over the source, read in batches."""
  indices = np.linspace(0, len(source) - 1, min(limit, len(source))).round().astype(int).tolist()
  read_many = getattr(source, "__getitems__", None)  # tfds: one call per batch is ~2x faster
  for start in range(0, len(indices), 1024):
    batch = indices[start:start + 1024]
    for record in (read_many(batch) if read_many else [source[i] for i in batch]):
      caption = record["caption"]
      yield caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def tokenizer_for_dataset(name: str, data_dir: str | os.PathLike | None = None,
                          vocab_size: int = 64, model_type: str = "unigram",
                          output_path: str | os.PathLike | None = None) -> Tokenizer:
  """The cached tokenizer of data set `name`, trained from its train captions on first use.

  With `output_path`, trains afresh and writes the model there instead of the cache.
  """
  path = Path(output_path) if output_path else cache_path(name, data_dir, vocab_size, model_type)
  if path.is_file() and not output_path:
    return Tokenizer.load(path)
  from jaxt2i.data import builders
  source = builders.data_source(name, "train", data_dir=data_dir)
  log.info("tokenizer: training on %d captions of %s (first use; cached at %s)", len(source),
           name, path)
  return train_tokenizer(_captions(source, _MAX_TRAINING_TEXTS), path, vocab_size=vocab_size,
                         model_type=model_type)


class CLIPTokenizer:
  """CLIP's byte-level BPE (Stable Diffusion's text tokenizer) from local files: a folder with
  vocab.json and merges.txt, or tokenizer.json (a Stable Diffusion folder's `tokenizer/`),
  through transformers' CLIPTokenizer. `encode` gives the same fixed-length rows as StableDiffusionPipeline:
  start-of-text, the text's tokens, end-of-text, then the pad token (end-of-text itself for SD
  1.x, "!" for SD 2.x, as tokenizer_config.json / special_tokens_map.json say)."""

  def __init__(self, tokenizer: Any, path: str | None = None):
    self._tok = tokenizer
    self.path = path

  @classmethod
  def load(cls, path: str | os.PathLike) -> CLIPTokenizer:
    path = os.fspath(path)
    has = lambda *names: all(os.path.isfile(os.path.join(path, n)) for n in names)  # noqa: E731
    if not (has("vocab.json", "merges.txt") or has("tokenizer.json")) and os.path.isdir(
        os.path.join(path, "tokenizer")):
      path = os.path.join(path, "tokenizer")
    if not (has("vocab.json", "merges.txt") or has("tokenizer.json")):
      raise FileNotFoundError(f"no CLIP tokenizer at {path}: expected vocab.json and "
                              "merges.txt, or tokenizer.json")
    try:
      import transformers
    except ImportError as e:
      raise ImportError("the CLIP tokenizer needs transformers: pip install 'jaxt2i[sd]'") from e
    return cls(transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True), path)

  def __repr__(self):
    return f"CLIPTokenizer({self.path!r}, vocab_size={self.vocab_size})"

  def save(self, folder: str | os.PathLike) -> None:
    """Writes the tokenizer's files (transformers' format) into the local `folder`."""
    self._tok.save_pretrained(os.fspath(folder))

  @property
  def vocab_size(self) -> int:
    return len(self._tok)

  @property
  def model_max_length(self) -> int:
    return int(min(self._tok.model_max_length, 10 ** 6))

  @property
  def pad_id(self) -> int:
    return int(self._tok.pad_token_id)

  @property
  def bos_id(self) -> int:
    return int(self._tok.bos_token_id)

  @property
  def eos_id(self) -> int:
    return int(self._tok.eos_token_id)

  def encode(self, texts: Sequence[str], max_length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [B, max_length], mask bool [B, max_length]); max_length defaults to
    the tokenizer's (77). Longer texts are cut to fit, ending in end-of-text, with a warning."""
    if isinstance(texts, (str, bytes)):
      raise TypeError("encode takes a sequence of texts; wrap a single text in a list")
    max_length = max_length or self.model_max_length
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (start and end of text), got {max_length}")
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    full = self._tok(texts, add_special_tokens=True)["input_ids"]
    ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=bool)
    truncated = 0
    for row, seq in enumerate(full):
      if len(seq) > max_length:
        truncated += 1
        seq = seq[:max_length - 1] + [self.eos_id]
      ids[row, :len(seq)] = seq
      mask[row, :len(seq)] = True
    if truncated:
      log.warning("CLIP tokenizer: truncated %d of %d prompts to %d tokens (end-of-text kept)",
                  truncated, len(texts), max_length)
    return ids, mask
