"""Evaluation benchmarks: the shapes-v1 evaluator, scoring, Frechet distance, FID Inception.

  python benchmarks/evaluation.py [evaluator] [scoring] [inception]

evaluator: trains the 64 px and 32 px evaluators from scratch (a fresh cache directory), and
  records their training time against the 10-minute goal and their calibration against the
  goals (real test images >= 98% fully correct at 64 px, >= 95% at 32 px; colour-swapped and
  shuffled captions < 5%), on 1000 images of test and test_heldout.
scoring: images/s of `score` (network + matching) against the generator rendering the same
  images; Frechet distance (eigen route) against scipy.linalg.sqrtm, time and value.
inception: FID Inception-v3 features/s of the Flax port against the PyTorch reference model
  (tests/torch_fid_inception.py) on this CPU, same random weights, batch 16 at 299 x 299.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from jaxt2i.data import shapes as shapes_data  # noqa: E402
from jaxt2i.eval import distribution  # noqa: E402
from jaxt2i.eval import shapes as shapes_eval  # noqa: E402

GOALS = {64: 0.98, 32: 0.95}


def evaluator(args):
  rows, data = [], {}
  with tempfile.TemporaryDirectory() as cache:
    for size in (64, 32):
      start = time.perf_counter()
      directory = shapes_eval.train_evaluator(size, cache, force=True)
      total = time.perf_counter() - start
      scorer = shapes_eval.load_evaluator(size, cache, train_if_missing=False)
      cal = {split: shapes_eval.calibrate(scorer, split, args.calibration_images)
             for split in ("test", "test_heldout")}
      data[size] = {"seconds_total": total, "calibration": cal,
                    "steps": shapes_eval.evaluator_config(size).train.num_steps}
      del directory
      for split, c in cal.items():
        rows.append(
            f"| {size} | {split} | {total / 60:.1f} min | {c['fully_correct']:.3f} "
            f"(goal >= {GOALS[size]}) | {c['color_acc']:.4f} / {c['shape_acc']:.4f} / "
            f"{c['size_acc']:.4f} / {c['place_acc']:.4f} | "
            f"{c['swapped_colors_fully_correct']:.3f} | "
            f"{c['shuffled_captions_fully_correct']:.3f} |")
  md = ("Evaluator trained from scratch by `shapes_eval.train_evaluator` (the recipe of "
        "`configs/shapes_evaluator.py`: "
        f"{data[64]['steps']} steps at 64 px, {data[32]['steps']} at 32 px, batch 64, scenes "
        "rendered on the fly), then calibrated on "
        f"{args.calibration_images} real images per split. Time includes compilation and the "
        "calibration (goal: <= 10 min).\n\n"
        "| px | split | train time | fully correct (real) | colour / shape / size / place "
        "acc | colours swapped | captions shuffled |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n")
  harness.record("shapes_evaluator", "python benchmarks/evaluation.py evaluator", md,
                 {str(k): v for k, v in data.items()})


def scoring(args):
  scorer = shapes_eval.load_evaluator(64)
  n = args.scoring_images
  start = time.perf_counter()
  records = [shapes_data.example("test", i, 64) for i in range(n)]
  render_s = time.perf_counter() - start
  images = np.stack([r["image"] for r in records])
  captions = [r["caption"] for r in records]
  scorer.score(images[:256], captions[:256])  # compile
  timing = harness.time_fn(lambda: scorer.score(images, captions), warmup=1,
                           repeats=args.repeats)
  feats = scorer.features(images)
  import scipy.linalg

  def scipy_fd():
    a, b = feats[: n // 2], feats[n // 2:]
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))

  ours_t = harness.time_fn(lambda: distribution.frechet_distance_features(
      feats[: n // 2], feats[n // 2:]), warmup=1, repeats=args.repeats)
  ref_t = harness.time_fn(scipy_fd, warmup=1, repeats=args.repeats)
  ours_v = distribution.frechet_distance_features(feats[: n // 2], feats[n // 2:])
  ref_v = scipy_fd()
  rate = n / timing.median_s
  md = (f"`score` on {n} real 64 px test images (batches of 256 through the jitted evaluator, "
        "then matching in Python), median of "
        f"{args.repeats}: **{rate:.0f} images/s**, against the generator rendering the same "
        f"images at {n / render_s:.0f} images/s ({rate / (n / render_s):.2f}x).\n\n"
        f"Frechet distance between two halves ({n // 2} each) of their 256-d features: "
        f"ours (eigendecomposition) {ours_t.median_s * 1e3:.1f} ms = {ours_v:.6f}; "
        f"scipy.linalg.sqrtm route {ref_t.median_s * 1e3:.1f} ms = {ref_v:.6f} "
        f"(ours {ref_t.median_s / ours_t.median_s:.1f}x faster, |diff| "
        f"{abs(ours_v - ref_v):.2e}).\n")
  harness.record("shapes_scoring", "python benchmarks/evaluation.py scoring", md, {
      "images_per_s": rate, "render_images_per_s": n / render_s, "fd_ours_s": ours_t.median_s,
      "fd_scipy_s": ref_t.median_s, "fd_ours": ours_v, "fd_scipy": ref_v})


def inception(args):
  import torch
  import torch_fid_inception as tfi
  from jaxt2i.eval import inception as inc
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  model = tfi.FIDInception3().eval()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "random.pth")
    torch.save(model.state_dict(), path)
    variables = inc.load_fid_inception(path)
  batch = args.inception_batch
  x = np.random.default_rng(0).uniform(-1, 1, (batch, 299, 299, 3)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  xj = jax.device_put(x)

  def ours():
    jax.block_until_ready(inc.inception_outputs(variables, xj)["pool"])

  def theirs():
    with torch.no_grad():
      model(xt)

  results = {}
  for name, fn in (("jaxt2i (Flax, XLA CPU)", ours), ("PyTorch reference", theirs)):
    results[name] = harness.time_fn(fn, warmup=2, repeats=args.repeats)
  rows = "\n".join(f"| {k} | {v.median_s:.3f} | {batch / v.median_s:.1f} |"
                   for k, v in results.items())
  t_ours, t_ref = (v.median_s for v in results.values())
  md = (f"FID Inception-v3 forward, batch {batch} at 299 x 299, float32, random weights "
        f"(the same in both), medians of {args.repeats}; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads.\n\n| implementation | s / batch | images/s |\n"
        f"|---|---|---|\n{rows}\n\nRatio jaxt2i / PyTorch time: **{t_ours / t_ref:.2f}x**.\n")
  harness.record("fid_inception", "python benchmarks/evaluation.py inception", md,
                 {k: v.as_dict() for k, v in results.items()})


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("which", nargs="*", default=["evaluator", "scoring", "inception"])
  parser.add_argument("--calibration_images", type=int, default=1000)
  parser.add_argument("--scoring_images", type=int, default=2048)
  parser.add_argument("--inception_batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  for name in args.which:
    {"evaluator": evaluator, "scoring": scoring, "inception": inception}[name](args)


if __name__ == "__main__":
  main()
