"""CLIP score and CLIP reranking with a trained CLIP run (configs/clip_shapes.py).

CLIPScore (Hessel et al. 2021, Sec. 3): for an image and its caption, w * max(cos(E_I, E_C), 0)
with w = 100 here (the paper's w = 2.5 rescales OpenAI CLIP's typical cosines; 100 is the
convention of torchmetrics and most text-to-image papers), averaged over the pairs.

Reranking (Ramesh et al. 2021, Sec. 2.5): DALL-E draws N candidates per prompt and keeps the
k whose CLIP similarity to the prompt is highest; `rerank` picks them from a [P, N] score
matrix, e.g. `CLIPScorer.cosine` of every candidate with its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxt2i.data.tokenizer import Tokenizer

# CLIPScore's weight w: 100 * max(cos, 0) lies in [0, 100].
SCORE_WEIGHT = 100.0


class CLIPScorer:
  """Embeds images and captions with a trained CLIP task; one compiled function per tower.

  Inputs are cut into batches of one fixed size (the last one padded), so each tower compiles
  once whatever the number of images.
  """

  def __init__(self, task: Any, params: Any, tokenizer: Tokenizer, *, batch_size: int = 64):
    if getattr(task, "name", None) != "clip":
      raise ValueError(f"CLIP scores need a 'clip' task, got {getattr(task, 'name', task)!r}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.task, self.params, self.tokenizer = task, params, tokenizer
    self.batch_size = batch_size
    self._images = jax.jit(task.embed_images)
    self._text = jax.jit(task.embed_text)

  @classmethod
  def load(cls, workdir: epath.PathLike, *, ema: bool = True, batch_size: int = 64
           ) -> CLIPScorer:
    """The scorer of a CLIP run directory: its config.json, tokenizer and (EMA) params."""
    from jaxt2i.data import pipeline
    from jaxt2i.eval.runner import load_run
    config, task, params = load_run(workdir, ema=ema)
    if config.task != "clip":
      raise ValueError(f"{workdir} is a {config.task!r} run, not a CLIP run (config.task="
                       "'clip', e.g. configs/clip_shapes.py)")
    return cls(task, params, pipeline.load_tokenizer(config.data, workdir),
               batch_size=batch_size)

  def _batched(self, fn, *arrays: np.ndarray) -> np.ndarray:
    n, b = len(arrays[0]), self.batch_size
    outs = []
    for start in range(0, n, b):
      chunk = [a[start:start + b] for a in arrays]
      m = len(chunk[0])
      if m < b:
        chunk = [np.concatenate([c, np.repeat(c[-1:], b - m, 0)]) for c in chunk]
      outs.append(np.asarray(jax.device_get(fn(self.params, *chunk)))[:m])
    return np.concatenate(outs)

  def image_embeddings(self, images: np.ndarray) -> np.ndarray:
    """Unit vectors [N, D] of uint8 images [N, H, W, 3] (or float ones in the run's
    config.data.value_range); other square sizes are resized to the run's."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
      raise ValueError(f"images must be a non-empty [N, H, W, 3] array, got shape "
                       f"{images.shape}")
    return self._batched(self._images, images)

  def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
    """Unit vectors [N, D] of captions."""
    if isinstance(captions, (str, bytes)) or not len(captions):
      raise ValueError("captions must be a non-empty sequence of strings")
    tokens, mask = self.tokenizer.encode(captions, int(self.task.config.data.max_caption_length))
    return self._batched(self._text, tokens.astype(np.int32), mask.astype(np.int32))

  def cosine(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """Cosine similarity [N] of image i with caption i."""
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images but {len(captions)} captions: they are scored "
                       "in pairs")
    return np.sum(self.image_embeddings(images) * self.text_embeddings(captions), axis=-1)

  def scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """Per-pair CLIP scores [N] in [0, 100]."""
    return per_pair_score(self.cosine(images, captions))


def per_pair_score(cosine: Any) -> np.ndarray:
  """100 * max(cos, 0) of each pair."""
  return SCORE_WEIGHT * np.maximum(np.asarray(cosine, np.float64), 0.0)


def clip_score(run: CLIPScorer | epath.PathLike, images: np.ndarray, captions: Sequence[str],
               *, ema: bool = True) -> float:
  """Mean CLIP score of image i with caption i, in [0, 100].

  `run` is a CLIP run directory or a loaded CLIPScorer (load it once to score many sets).
  """
  scorer = run if isinstance(run, CLIPScorer) else CLIPScorer.load(run, ema=ema)
  return float(np.mean(scorer.scores(images, captions)))


def rerank(scores: Any, k: int) -> Any:
  """Indices [P, k] of the k highest scores in each row of `scores` [P, N], best first; equal
  scores keep their order (the lower index first).

  numpy in, numpy out; a jax array (also under jit) gives a jax array. NaN scores raise for
  numpy input; under jit they cannot be checked and rank first (lax.top_k's order).
  """
  shape = np.shape(scores)
  if len(shape) != 2:
    raise ValueError(f"scores must be [prompts, candidates], got shape {shape}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= shape[1]:
    raise ValueError(f"k={k!r} must be an integer in [1, {shape[1]}] (the number of "
                     "candidates per prompt)")
  if isinstance(scores, jax.Array):
    # lax.top_k is stable: among equal values the lower index comes first.
    return jax.lax.top_k(scores, int(k))[1]
  scores = np.asarray(scores, np.float64)  # negating unsigned ints would wrap around
  if np.isnan(scores).any():
    rows = sorted(set(np.argwhere(np.isnan(scores))[:, 0].tolist()))
    raise ValueError(f"scores hold NaN (rows {rows[:8]}): a NaN candidate cannot be ranked")
  # A stable sort of the negated scores: descending, ties in index order.
  return np.argsort(-scores, axis=1, kind="stable")[:, :int(k)]


def rerank_gain(scores: Any, quality: Any, counts: Sequence[int] | None = None
                ) -> dict[str, Any]:
  """How much keeping the CLIP-best of n candidates helps, against its two bounds.

  `scores` [P, N]: a reranker's score of every candidate of P prompts (higher is better);
  `quality` [P, N]: how good each candidate is, e.g. whether it is right (booleans: shapes-v1
  fully correct) or the fraction of its attributes that are. For each n in `counts` (default
  1, 2, 4, ... up to N), over the first n candidates of every prompt, the mean over prompts of:
    - `reranked`: the quality of the CLIP-best candidate (ties keep the lower index, as
      `rerank` does);
    - `single`: the expected quality of one candidate drawn at random (no reranking);
    - `oracle`: the best candidate's quality (what a perfect reranker would keep).
  Also `pairwise_accuracy`: over all candidate pairs of the same prompt whose quality differs,
  the fraction the scores order the same way (ties count half); 0.5 is a reranker that knows
  nothing, 1.0 a perfect one; NaN when no prompt has such a pair.
  """
  scores = np.asarray(scores, np.float64)
  quality = np.asarray(quality)
  if scores.ndim != 2 or scores.shape != quality.shape:
    raise ValueError(f"scores {scores.shape} and quality {quality.shape} must both be "
                     "[prompts, candidates]")
  if not (np.issubdtype(quality.dtype, np.number) or quality.dtype == bool):
    raise ValueError(f"quality must be numbers or booleans, got dtype {quality.dtype}")
  quality = quality.astype(np.float64)
  if not np.isfinite(quality).all():
    raise ValueError("quality holds NaN or infinite values")
  num = scores.shape[1]
  if counts is None:
    counts = [2 ** i for i in range(num.bit_length()) if 2 ** i <= num]
  curve = []
  for n in counts:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num:
      raise ValueError(f"count {n!r} must be an integer in [1, {num}]")
    best = rerank(scores[:, :n], 1)[:, 0]
    curve.append({"n": int(n),
                  "reranked": float(quality[np.arange(len(best)), best].mean()),
                  "single": float(quality[:, :n].mean()),
                  "oracle": float(quality[:, :n].max(axis=1).mean())})
  # Within each prompt: sign of (score of the better one - score of the worse one).
  diff = scores[:, :, None] - scores[:, None, :]
  pairs = quality[:, :, None] > quality[:, None, :]
  num_pairs = int(pairs.sum())
  accuracy = float("nan")
  if num_pairs:
    accuracy = float(((diff > 0) + 0.5 * (diff == 0))[pairs].sum() / num_pairs)
  return {"curve": curve, "pairwise_accuracy": accuracy, "pairs": num_pairs,
          "prompts": int(scores.shape[0]), "candidates": int(num)}
