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

# Re-exported: the benchmarks call them as harness.time_fn, harness.matmul_ceiling, ...
from jaxt2i.bench import Timing, environment, matmul_ceiling, on_accelerator, time_fn

__all__ = ["Timing", "compile_seconds", "environment", "matmul_ceiling", "on_accelerator",
           "record", "time_fn", "xla_flops"]

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
