"""`jaxt2i eval`: sample a trained run on shapes-v1 prompts, score, measure, report.

    workdir (config.json + checkpoints) -> task + EMA params -> K images for each of M prompts
      of `test` and `test_heldout` -> shapes-v1 verdicts, Frechet distance and KID against the
      real `test` split (evaluator features), diversity -> eval.json + index.html

The same `evaluate_images` serves the trainer's periodic eval hook (config.eval).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from jaxt2i.data import shapes as shapes_data
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.eval import distribution, report
from jaxt2i.eval import shapes as shapes_eval

EVAL_SPLITS = ("test", "test_heldout")
NUM_REAL_FEATURES = 2000
REAL_FLOOR_OFFSET = 100_000  # real images for the floor come from here on, not the reference


def eval_prompts(num_prompts: int, splits: Sequence[str] = EVAL_SPLITS
                 ) -> list[tuple[str, str]]:
  """(split, caption) for the first `num_prompts` records of each split: fixed across runs.
  `train` gives training captions: for choosing sampling settings without looking at the
  test prompts."""
  splits = tuple(dict.fromkeys(splits))
  for split in splits:
    if split not in shapes_data.SPLITS:
      raise ValueError(f"unknown shapes-v1 split {split!r}; choose from {list(shapes_data.SPLITS)}")
  if not splits:
    raise ValueError("no splits to evaluate")
  return [(split, shapes_data.example(split, i, 8)["caption"])
          for split in splits for i in range(num_prompts)]


def generate_images(task, params, tokenizer: Tokenizer, captions: Sequence[str], *,
                    samples_per_prompt: int = 1, seed: int = 0, batch_size: int = 64,
                    sample_fn=None) -> np.ndarray:
  """uint8 [len(captions) * K, H, W, 3]: K samples of each caption, prompt-major.

  Batches have one fixed size (padded), so the sampler compiles once; batch b uses the key
  fold_in(seed, b), so the images depend only on (params, captions, K, seed, batch_size).
  """
  repeated = [c for c in captions for _ in range(samples_per_prompt)]
  if not repeated:
    raise ValueError("no captions to sample")
  max_length = int(task.config.data.max_caption_length)
  tokens, mask = tokenizer.encode(repeated, max_length)
  sample_fn = sample_fn or jax.jit(task.sample)
  batch_size = min(batch_size, len(repeated))
  outs = []
  for b, start in enumerate(range(0, len(repeated), batch_size)):
    t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
    n = t.shape[0]
    if n < batch_size:
      t = np.concatenate([t, np.repeat(t[-1:], batch_size - n, 0)])
      m = np.concatenate([m, np.repeat(m[-1:], batch_size - n, 0)])
    batch = {"tokens": jnp.asarray(t, jnp.int32), "tokens_mask": jnp.asarray(m, jnp.int32)}
    images = sample_fn(params, batch, jax.random.fold_in(jax.random.key(seed), b))
    outs.append(np.asarray(jax.device_get(images))[:n])
    logging.info("sampled %d / %d images", start + n, len(repeated))
  return np.concatenate(outs)


def real_features(scorer: shapes_eval.ShapesScorer, split: str = "test",
                  num_images: int = NUM_REAL_FEATURES) -> np.ndarray:
  """Evaluator features of the first `num_images` real images of `split`, cached beside the
  evaluator (they only change when the evaluator does)."""
  path = None
  if scorer.directory is not None:
    path = scorer.directory / f"real_features_{split}_{num_images}.npy"
    if path.exists():
      with path.open("rb") as f:
        return np.load(f)
  images = np.stack([shapes_data.example(split, i, scorer.image_size)["image"]
                     for i in range(num_images)])
  feats = scorer.features(images).astype(np.float32)
  if path is not None:
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
      np.save(f, feats)
    tmp.rename(path)
  return feats


def split_rows(prompts: Sequence[tuple[str, str]], k: int, split: str) -> list[int]:
  """Indices of `split`'s samples in a prompt-major batch of K samples per prompt."""
  return [i * k + j for i, (s, _) in enumerate(prompts) if s == split for j in range(k)]


def evaluate_images(images: np.ndarray, prompts: Sequence[tuple[str, str]],
                    samples_per_prompt: int, scorer: shapes_eval.ShapesScorer, *,
                    num_real: int = NUM_REAL_FEATURES, kid_subset_size: int = 1000
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Scores prompt-major samples ([len(prompts) * K, ...]); returns per-split results and the
  per-prompt records for the report."""
  k = samples_per_prompt
  if len(images) != len(prompts) * k:
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts x {k} samples")
  captions = [c for _, c in prompts for _ in range(k)]
  verdicts = scorer.judge(images, captions)
  feats = scorer.features(images)
  real = real_features(scorer, "test", num_real)
  results: dict[str, Any] = {}
  for split in dict.fromkeys(s for s, _ in prompts):
    rows = split_rows(prompts, k, split)
    split_feats = feats[rows]
    res = shapes_eval.summarize([verdicts[r] for r in rows])
    if len(rows) >= 2:
      res["frechet_distance"] = distribution.frechet_distance_features(split_feats, real)
      # The same statistic for as many real images of the split (not in the reference set):
      # the floor a perfect model would reach at this sample count.
      floor = scorer.features(np.stack([
          shapes_data.example(split, REAL_FLOOR_OFFSET + i, scorer.image_size)["image"]
          for i in range(len(rows))]))
      res["frechet_distance_real"] = distribution.frechet_distance_features(floor, real)
      res["kid"] = distribution.kernel_distance(split_feats, real,
                                                subset_size=min(kid_subset_size, len(rows)),
                                                num_subsets=50)[0]
    if k >= 2:
      res["diversity"] = distribution.diversity(split_feats, [r // k for r in rows])
    results[split] = res
  per_prompt = [{"split": s, "caption": c, "images": images[i * k:(i + 1) * k],
                 "verdicts": verdicts[i * k:(i + 1) * k]} for i, (s, c) in enumerate(prompts)]
  return results, per_prompt


def load_run(workdir: epath.PathLike, *, ema: bool = True, clip_workdir: str | None = None,
             step: int | None = None):
  """(config, task, params) of a trained run: its config.json and latest checkpoint (or the
  one of `step`), plus the task's constant subtrees (Task.constant_keys) from
  Task.initial_values. `clip_workdir` (DALL-E runs) attaches a CLIP run as the reranker
  (DalleTask.with_clip)."""
  from jaxt2i.parallel import partitioning
  from jaxt2i.tasks.base import get_task
  from jaxt2i.training import config as config_lib
  from jaxt2i.training.checkpoint import restore_params
  workdir = epath.Path(workdir)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a jaxt2i run: no config.json (train one with "
                            "`jaxt2i train --config ... --workdir DIR`)")
  config = config_lib.from_json_dict(json.loads((workdir / "config.json").read_text()))
  task = get_task(config)
  size, length = config.data.image_size, config.data.max_caption_length
  dummy = {"image": jnp.zeros((1, size, size, 3), jnp.float32),
           "tokens": jnp.zeros((1, length), jnp.int32),
           "tokens_mask": jnp.ones((1, length), jnp.int32)}
  abstract = partitioning.unbox(jax.eval_shape(task.init, jax.random.key(0), dummy))
  constant = tuple(task.constant_keys)
  if step is not None and not (workdir / "checkpoints" / str(step)).exists():
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    raise FileNotFoundError(f"{workdir} has no checkpoint of step {step} (kept: {kept})")
  # Read eagerly even inside a trace: tasks load their frozen parts (a first stage) lazily,
  # e.g. first inside jax.eval_shape(task.init); the restored arrays are data, not values of
  # the traced function.
  with jax.ensure_compile_time_eval():
    params = restore_params(workdir / "checkpoints",
                            {k: v for k, v in abstract.items() if k not in constant}, ema=ema,
                            step=step)
  if constant:  # e.g. a LoRA run's base model, read from where the run read it
    values = task.constant_values()
    params = {**{k: values[k] for k in constant}, **params}
  if clip_workdir:
    if not hasattr(task, "with_clip"):
      raise ValueError(f"clip_workdir={clip_workdir}: {config.task!r} runs do not rerank with "
                       "CLIP (DALL-E runs do)")
    params = task.with_clip(params, clip_workdir)
  return config, task, params


# The config.model fields an eval report records as its sampling settings (those the task has).
SAMPLING_FIELDS = ("sampler", "num_sampling_steps", "guidance_scale", "temperature", "top_k",
                   "top_p", "num_candidates", "clip_workdir")


def evaluate_workdir(workdir: epath.PathLike, *, num_prompts: int = 16,
                     samples_per_prompt: int = 4, seed: int = 0, out_dir: epath.PathLike | None = None,
                     cache_dir: str | None = None,
                     sampling: dict[str, Any] | None = None,
                     clip_workdir: str | None = None, step: int | None = None,
                     splits: Sequence[str] = EVAL_SPLITS) -> dict[str, Any]:
  """Samples, scores and reports a trained run; writes eval.json + index.html to `out_dir`
  (default the workdir) and returns the results. `sampling` overrides config.model sampling
  fields of the run (e.g. {"guidance_scale": 1.0, "num_sampling_steps": 50}); `clip_workdir`
  reranks a DALL-E run with that CLIP run (see load_run); `step` picks a kept checkpoint
  (default the latest); `splits` are the shapes-v1 splits whose prompts are sampled
  (`eval_prompts`)."""
  from jaxt2i.data import pipeline
  start = time.perf_counter()
  prompts = eval_prompts(num_prompts, splits)  # bad splits fail before the run loads
  config, task, params = load_run(workdir, clip_workdir=clip_workdir, step=step)
  sampling = dict(sampling or {})
  unknown = sorted(set(sampling) - set(config.model.keys()))
  if unknown:
    raise ValueError(f"{config.task!r} runs have no sampling setting(s) "
                     f"{['model.' + k for k in unknown]}")
  with config.unlocked():
    for key, value in sampling.items():
      config.model[key] = value
  tokenizer = pipeline.load_tokenizer(config.data, workdir)
  logging.info("sampling %d prompts x %d", len(prompts), samples_per_prompt)
  images = generate_images(task, params, tokenizer, [c for _, c in prompts],
                           samples_per_prompt=samples_per_prompt, seed=seed)
  scorer = shapes_eval.load_evaluator(shapes_eval.nearest_evaluator_size(images.shape[1]),
                                      cache_dir)
  splits, per_prompt = evaluate_images(images, prompts, samples_per_prompt, scorer)
  results = {"workdir": str(workdir), "task": config.task, "step": step,
             "num_prompts": num_prompts,
             "samples_per_prompt": samples_per_prompt, "seed": seed,
             "sampling": {k: config.model[k] for k in SAMPLING_FIELDS if k in config.model},
             "evaluator": str(scorer.directory), "seconds": round(time.perf_counter() - start, 1),
             "splits": splits}
  page = report.write_report(out_dir or workdir, results, per_prompt,
                             title=f"jaxt2i eval: {epath.Path(workdir).name}")
  logging.info("report: %s", page)
  return results


def hook_results(trainer_task, params, tokenizer, eval_cfg: ml_collections.ConfigDict,
                 image_size: int, cache_dir: str | None = None, sample_fn=None
                 ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """The trainer's periodic shapes-v1 eval: scalars and per-split sample grids."""
  prompts = eval_prompts(eval_cfg.shapes_prompts)
  k = eval_cfg.samples_per_prompt
  images = generate_images(trainer_task, params, tokenizer, [c for _, c in prompts],
                           samples_per_prompt=k, seed=eval_cfg.seed, sample_fn=sample_fn)
  scorer = shapes_eval.load_evaluator(shapes_eval.nearest_evaluator_size(image_size), cache_dir)
  splits, _ = evaluate_images(images, prompts, k, scorer)
  scalars, grids = {}, {}
  for split, res in splits.items():
    scalars[f"shapes_{split}/fully_correct"] = res["fully_correct"]
    for name, value in res["per_attribute"].items():
      scalars[f"shapes_{split}/{name}"] = value
    for name in ("frechet_distance", "frechet_distance_real", "kid", "diversity"):
      if name in res:
        scalars[f"shapes_{split}/{name}"] = res[name]
  for split in dict.fromkeys(s for s, _ in prompts):
    rows = split_rows(prompts, k, split)
    grids[f"shapes_{split}"] = images[rows]
  return scalars, grids


def main_summary(results: Mapping[str, Any]) -> str:
  lines = []
  for split, res in results["splits"].items():
    per = ", ".join(f"{k} {v:.3f}" for k, v in res["per_attribute"].items())
    extra = ", ".join(f"{k} {res[k]:.4g}" for k in ("frechet_distance", "frechet_distance_real",
                                                     "kid", "diversity") if k in res)
    lines.append(f"{split}: fully correct {res['fully_correct']:.3f} ({per}); {extra}")
  return "\n".join(lines)


def read_images(path: str) -> np.ndarray:
  """uint8 [N, H, W, 3] from a folder of image files (sorted by name) or an .npz/.npy."""
  from PIL import Image
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such images path: {path}")
  if p.is_dir():
    files = sorted(f for f in p.iterdir()
                   if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
      raise ValueError(f"{path}: no .png/.jpg/.webp/.bmp images in the folder")
    images = []
    for f in files:
      with Image.open(f) as im:
        images.append(np.asarray(im.convert("RGB")))
    shapes_seen = {im.shape for im in images}
    if len(shapes_seen) > 1:
      raise ValueError(f"{path}: images of different sizes {sorted(shapes_seen)}")
    return np.stack(images)
  if p.suffix == ".npz":
    with np.load(p) as data:
      key = "images" if "images" in data.files else data.files[0]
      images = data[key]
  elif p.suffix == ".npy":
    images = np.load(p)
  else:
    raise ValueError(f"{path}: expected a folder of images, an .npz or an .npy")
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"{path}: expected uint8 images [N, H, W, 3], got {images.dtype} "
                     f"{images.shape}")
  return images


def read_captions(path: str) -> list[str]:
  """One caption per line (blank lines at the end ignored)."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no such captions file: {path}")
  lines = p.read_text().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  return [line.strip() for line in lines]
