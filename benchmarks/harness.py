"""Timing harness: warm-up, block_until_ready, median of repeats, compile time apart, and
results recorded with the machine and library versions.

The timing loop, the matmul ceiling (the MFU denominator) and the machine description are
jaxt2i.bench's, which `jaxt2i bench` uses too: one implementation for both."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Re-exported: the benchmarks call them as harness.time_fn, harness.matmul_ceiling, ...
from jaxt2i.bench import Timing, environment, matmul_ceiling, on_accelerator, time_fn

__all__ = ["Timing", "attribute_cells", "compile_seconds", "environment", "matmul_ceiling",
           "on_accelerator", "reconstruction_quality", "record", "time_fn", "training_time",
           "xla_flops"]

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"


def compile_seconds(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_flops(jitted, *args) -> float:
  """XLA's FLOP count of `jitted(*args)`, from the lowered program: the compiled program's
  cost analysis on GPUs leaves out the cuBLAS / cuDNN custom calls (matmuls, convolutions),
  which is nearly all of a model's work."""
  cost = jitted.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def training_time(workdir: Path) -> dict:
  """A run's training time from its metrics.jsonl: steps / the median logged steps/s (so
  compilation, evals and the pauses of a stopped or resumed run do not count)."""
  lines = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  if not train:
    raise ValueError(f"{workdir}/metrics.jsonl has no training lines")
  rate = float(np.median([l["perf/steps_per_s"] for l in train]))
  steps = max(l["step"] for l in train)
  return {"steps": steps, "minutes": steps / rate / 60, "steps_per_s": rate}


def reconstruction_quality(config, reconstruct, num_images: int, batch: int = 100) -> dict:
  """A first stage's reconstructions of the first `num_images` shapes-v1 `test` images: mean
  PSNR and the shapes-v1 score (the ceiling it leaves the second stage). `reconstruct` maps
  float32 images in config.data.value_range to the same."""
  from jaxt2i.data import shapes as shapes_data
  from jaxt2i.eval import shapes as shapes_eval
  size = config.data.image_size
  records = [shapes_data.example("test", i, size) for i in range(num_images)]
  images = np.stack([r["image"] for r in records])
  low, high = config.data.value_range
  recons = []
  for start in range(0, num_images, batch):
    x = np.asarray(images[start:start + batch], np.float32) / 255.0 * (high - low) + low
    recon = np.clip(np.asarray(reconstruct(x), np.float32), low, high)
    recons.append((recon - low) / (high - low))
  recon = np.concatenate(recons)
  mse = np.mean(np.square(recon - images / 255.0), axis=(1, 2, 3))
  recon_uint8 = (recon * 255 + 0.5).clip(0, 255).astype(np.uint8)
  scorer = shapes_eval.load_evaluator(shapes_eval.nearest_evaluator_size(size))
  score = scorer.score(recon_uint8, [r["caption"] for r in records])
  return {"psnr": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))),
          "num_images": num_images, "reconstructions_fully_correct": score["fully_correct"],
          "reconstructions_per_attribute": score["per_attribute"]}


def attribute_cells(result: dict) -> str:
  """A shapes-v1 split result's per-attribute accuracies for a table cell, in a fixed order:
  colour / shape / size / place / count."""
  return " / ".join(f"{result['per_attribute'][k]:.3f}"
                    for k in ("color", "shape", "size", "place", "count"))


def record(name: str, command: str, markdown: str, data: dict) -> None:
  """Writes results/NAME.json and replaces NAME's section of RESULTS.md. On an accelerator the
  section is NAME_<platform> (e.g. unet_step_gpu), beside the CPU one."""
  env = environment()
  if on_accelerator():
    name = f"{name}_{jax.default_backend()}"
  RESULTS_DIR.mkdir(exist_ok=True)
  (RESULTS_DIR / f"{name}.json").write_text(
      json.dumps({"name": name, "command": command, "environment": env, **data}, indent=2))
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
  section = (f"<!-- bench:{name} -->\n## {name}\n\n"
             f"- machine: {env['cpu']}, {env['cores']} cores, {env['devices']}; "
             f"Python {env['python']}; {env['date']}\n- versions: {versions}\n"
             f"- command: `{command}`\n\n{markdown.strip()}\n<!-- /bench:{name} -->")
  text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
  pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->",
                       re.S)
  text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
      text.rstrip() + "\n\n" + section + "\n")
  RESULTS_MD.write_text(text)
  print(section)
