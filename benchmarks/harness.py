"""Timing harness: warm-up, block_until_ready, median of repeats, compile time apart, and
results recorded with the machine and library versions."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"


@dataclasses.dataclass
class Timing:
  median_s: float
  min_s: float
  max_s: float
  repeats: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> Timing:
  """Times `fn()` (which must block on its own result, e.g. via jax.block_until_ready)."""
  for _ in range(warmup):
    fn()
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)
  return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def compile_seconds(jitted, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def on_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def xla_flops(jitted, *args) -> float:
  """XLA's FLOP count of `jitted(*args)`, from the lowered program: the compiled program's
  cost analysis on GPUs leaves out the cuBLAS / cuDNN custom calls (matmuls, convolutions),
  which is nearly all of a model's work."""
  cost = jitted.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def matmul_ceiling(sizes=None, dtype=None, repeats: int = 5) -> dict:
  """The machine's measured dense-matmul rate under XLA: the best FLOP/s of square [n, n] @
  [n, n] products over `sizes` (2 n^3 FLOPs each), the denominator of model FLOP utilisation.
  Defaults: float32 at n = 1024..4096 on CPUs; bfloat16 at n = 4096..16384 on accelerators,
  whose published peaks are seldom reached (the measured rate is the honest denominator)."""
  import jax.numpy as jnp
  if sizes is None:
    sizes = (4096, 8192, 16384) if on_accelerator() else (1024, 2048, 4096)
  if dtype is None:
    dtype = "bfloat16" if on_accelerator() else "float32"
  rates = {}
  for n in sizes:
    a = jnp.ones((n, n), dtype) * 0.5
    b = jnp.ones((n, n), dtype) * 0.25
    f = jax.jit(lambda x, y: x @ y)
    timing = time_fn(lambda: jax.block_until_ready(f(a, b)), warmup=1, repeats=repeats)
    rates[n] = 2.0 * n ** 3 / timing.min_s
  best = max(rates, key=rates.get)
  return {"flops_per_s": rates[best], "best_size": best, "by_size": rates, "dtype": dtype}


def environment() -> dict:
  cpu = platform.processor()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                  "tensorflow-datasets", "numpy", "torch", "diffusers"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "python": platform.python_version(), "versions": versions}


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
