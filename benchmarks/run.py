"""Foundation benchmarks, each compared with a baseline measured in the same run.

  python benchmarks/run.py [trainer_overhead] [input_pipeline] [matmul_ceiling] [--steps N]

trainer_overhead: steps/s of `Trainer.train` (host loop: batch assembly, metrics, divergence
  and checkpoint checks) against a bare loop of the same compiled step fed the same numpy
  batches with `jax.device_put`. Data loading is excluded from both (see input_pipeline).
input_pipeline: examples/s of the grain loader on shapes_v1/64 (decode, scale, tokenize,
  batch) against the examples/s that training the default model consumes: the `make demo`
  latent diffusion recipe (configs/ldm_shapes.py:demo, its first stage at random weights).
matmul_ceiling: the best float32 matmul FLOP/s XLA reaches here, the denominator of model FLOP
  utilisation on a CPU (no published peak), and the MFU of the last recorded U-Net step.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from configs.baseline_shapes import get_config  # noqa: E402
from jaxt2i.data import builders, pipeline  # noqa: E402
from jaxt2i.training.trainer import Trainer  # noqa: E402


def default_config(data_dir: str):
  config = get_config()
  config.data.data_dir = data_dir
  config.train.log_every = 10**9
  config.train.eval_every = 0
  config.checkpoint.every_steps = 10**9
  config.mesh.data = 1
  return config


def make_batches(config, n: int = 8):
  loader = pipeline.make_loader(config.data, global_batch_size=config.batch_size,
                                seed=0, num_epochs=None)
  it = iter(loader)
  return [next(it) for _ in range(n)]


def trainer_overhead(args) -> dict:
  config = default_config(args.data_dir)
  config.train.num_steps = args.steps
  batches = make_batches(config)
  devices = jax.devices()[:1]

  def trainer_run():
    with tempfile.TemporaryDirectory() as workdir:
      trainer = Trainer(config, workdir, devices=devices)
      trainer.train(batches=itertools.cycle(batches))
      trainer.writer.close()
      trainer.checkpointer.close()
    return trainer, trainer.loop_timing["seconds"] / trainer.loop_timing["steps"]

  def bare_loop(trainer):
    step_fn, sharding = trainer.train_step, trainer.batch_sharding
    with jax.set_mesh(trainer.mesh):
      state = trainer._init(jax.random.key(0))
      jax.block_until_ready(state)
      start = time.perf_counter()
      for i in range(args.steps):
        batch = {k: jax.device_put(v, sharding) for k, v in batches[i % len(batches)].items()
                 if k in pipeline.BATCH_KEYS}
        state, _ = step_fn(state, batch)
      jax.block_until_ready(state)
    return (time.perf_counter() - start) / args.steps

  # Interleaved, so that a slow patch of a shared machine hits both loops alike.
  per_step, bare = [], []
  for _ in range(args.repeats):
    trainer, seconds = trainer_run()
    per_step.append(seconds)
    bare.append(bare_loop(trainer))
  trainer_s, bare_s = float(np.median(per_step)), float(np.median(bare))
  overhead = trainer_s / bare_s - 1.0
  md = (f"Default baseline recipe (64x64, batch {config.batch_size}), 1 CPU device, "
        f"{args.steps} steps x {args.repeats} repeats, medians; compile "
        f"{trainer.compile_seconds:.1f} s (not in the step times).\n\n"
        "| loop | s/step | steps/s |\n|---|---|---|\n"
        f"| bare jitted step + device_put | {bare_s:.4f} | {1 / bare_s:.2f} |\n"
        f"| Trainer.train | {trainer_s:.4f} | {1 / trainer_s:.2f} |\n\n"
        f"**Trainer overhead: {overhead * 100:+.1f}%** (goal: under 5%). Every repeat, s/step: "
        f"trainer {', '.join(f'{x:.4f}' for x in per_step)}; "
        f"bare {', '.join(f'{x:.4f}' for x in bare)}.")
  data = {"trainer_s_per_step": trainer_s, "bare_s_per_step": bare_s, "overhead": overhead,
          "compile_s": trainer.compile_seconds, "all_trainer": per_step, "all_bare": bare}
  harness.record("trainer_overhead", "python benchmarks/run.py trainer_overhead", md, data)
  return data


def default_model_rate(args) -> float:
  """Examples/s of Trainer.train on the `make demo` LDM (configs/ldm_shapes.py:demo) over
  pre-loaded batches, after compilation: what the input pipeline must keep up with."""
  from configs.autoencoder_shapes import get_config as ae_config
  from configs.ldm_shapes import get_config as ldm_config
  from jaxt2i.tasks.ldm import _AE_FIELDS, LatentDiffusionTask

  class RandomFirstStage(LatentDiffusionTask):
    def prepare(self, batch):
      del batch

    def initial_values(self):
      return None

  config = ldm_config("demo")
  config.data.data_dir = args.data_dir
  ae = ae_config("demo").model
  config.model.autoencoder = {k: ae[k] for k in _AE_FIELDS}
  config.model.latent_scale = 1.0
  config.train.num_steps = args.steps
  config.train.log_every = 10**9
  config.checkpoint.every_steps = 10**9
  config.eval.shapes_prompts = 0
  batches = make_batches(config)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = Trainer(config, workdir, task=RandomFirstStage(config), devices=jax.devices()[:1])
    trainer.train(batches=itertools.cycle(batches))
    trainer.writer.close()
    trainer.checkpointer.close()
  timing = trainer.loop_timing
  return config.batch_size * timing["steps"] / timing["seconds"]


def input_pipeline(args, step_examples_per_s: float | None) -> dict:
  config = default_config(args.data_dir)
  results = {}
  for workers in (0, 1, 2):
    config.data.worker_count = workers
    loader = pipeline.make_loader(config.data, global_batch_size=config.batch_size, seed=0)
    it = iter(loader)
    for _ in range(3):  # warm-up (starts workers, fills buffers)
      next(it)
    n = args.pipeline_batches
    start = time.perf_counter()
    for _ in range(n):
      next(it)
    results[workers] = n * config.batch_size / (time.perf_counter() - start)
    del it, loader
  best = max(results.values())
  rows = "\n".join(f"| {w} | {v:.0f} |" for w, v in results.items())
  md = (f"grain loader on shapes_v1/64 train (decode, scale to [-1, 1], sentencepiece "
        f"tokenize, batch {config.batch_size}); {args.pipeline_batches} batches after warm-up."
        f"\n\n| grain worker processes | examples/s |\n|---|---|\n{rows}\n")
  if step_examples_per_s:
    md += (f"\nTraining the default model (`configs/ldm_shapes.py:demo`, the `make demo` "
           f"latent diffusion U-Net with its autoencoder's encoder in the step) consumes "
           f"{step_examples_per_s:.0f} examples/s on this machine: the pipeline delivers "
           f"**{best / step_examples_per_s:.1f}x** that (goal: at least 5x).")
  md += f"\n\n1-minute load average at the end: {os.getloadavg()[0]:.2f} (2 cores)."
  data = {"examples_per_s_by_workers": results, "step_examples_per_s": step_examples_per_s}
  harness.record("input_pipeline", "python benchmarks/run.py input_pipeline", md, data)
  return data


def matmul_ceiling(args) -> dict:
  """The XLA float32 matmul ceiling of this machine, and the model FLOP utilisation it implies
  for the last recorded U-Net step (benchmarks/unet.py measures both in one run)."""
  import json
  ceiling = harness.matmul_ceiling()
  rate = ceiling["flops_per_s"]
  md = (f"Best of square float32 matmuls under XLA, 2 n^3 FLOPs each, minimum of 5: **"
        f"{rate / 1e9:.0f} GFLOP/s** (" + ", ".join(
            f"n={n}: {r / 1e9:.0f}" for n, r in ceiling["by_size"].items()) + " GFLOP/s); "
        f"1-minute load average {os.getloadavg()[0]:.2f}.\n")
  unet = harness.RESULTS_DIR / "unet_step.json"
  if unet.exists():
    u = json.loads(unet.read_text())["jaxt2i"]
    train = u["train_flops"] / u["train"]["median_s"]
    sample = u["sample_flops"] / u["sample"]["median_s"]
    md += (f"\nThe recorded U-Net step (unet_step, an earlier run on this machine): train "
           f"{train / 1e9:.0f} GFLOP/s = **{train / rate:.0%} of the ceiling**, sampling "
           f"{sample / 1e9:.0f} GFLOP/s = {sample / rate:.0%}. Its convolutions have 64-256 "
           "channels and its attention heads 8-16 values: far smaller operands than the "
           "ceiling's matmuls.\n")
    ceiling.update(unet_train_mfu=train / rate, unet_sample_mfu=sample / rate)
  harness.record("matmul_ceiling", "python benchmarks/run.py matmul_ceiling", md, ceiling)
  return ceiling


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("which", nargs="*", default=["trainer_overhead", "input_pipeline"])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pipeline_batches", type=int, default=40)
  parser.add_argument("--data_dir", default=os.environ.get("JAXT2I_DATA_DIR",
                                                           str(REPO / ".cache" / "data")))
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  os.environ["JAXT2I_DATA_DIR"] = args.data_dir
  builders.build("shapes", data_dir=args.data_dir, variant="64")
  if "trainer_overhead" in args.which:
    trainer_overhead(args)
  if "input_pipeline" in args.which:
    input_pipeline(args, default_model_rate(args))
  if "matmul_ceiling" in args.which:
    matmul_ceiling(args)


if __name__ == "__main__":
  main()
