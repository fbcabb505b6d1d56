"""DALL-E's sparse attention against dense masked attention, and KV-cache sampling against
recomputing the stream, on this CPU (jaxt2i/models/attention.py, jaxt2i/models/transformer.py).

  python benchmarks/sparse_attention.py [--repeats 5] [--parts attention sampling]
      [--batch 2] [--dtype float32] [--no_record]

attention: `sparse_attention` (only the blocks its mask keeps) against `dot_product_attention`
  with the same pattern's dense mask (every query-key pair computed, the masked ones thrown
  away), both on the default backend (einsum on CPU), for 32 text + 16x16 and 32 text + 32x32
  image tokens, batch 2, 8 heads of 64, float32; row, column and conv (11 x 11) patterns;
  forward, and forward + backward of sum(out * g). The FLOP ratio counts the query-key pairs
  each path multiplies: dense L^2; sparse T^2 for the text plus, per image query, T text
  keys and its block's keys (its row, its column, or for conv its row and the 5 rows above).
  Both passes cost a fixed number of FLOPs per pair (4 D forward, 14 D forward + backward,
  whose flash-style gradient recomputes the logits), so the ratio of pairs is the FLOP
  ratio. Goal: a measured speed-up of at least 70% of it.
sampling: image tokens per second of `generate` (a 4-layer, 256-wide model with the paper's
  layer patterns, 32 text + 16x16 image tokens, 8192 image codes) with the KV cache, against
  the same loop recomputing the whole stream every step. Goal: at least 10x.

On an accelerator the defaults are batch 16 and bfloat16, and the section is recorded as
`sparse_attention_gpu`.

Runs are timed alternately (dense, sparse, dense, ...) so that load from other work on the
machine falls on both sides of each ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from jaxt2i.models import transformer as tr  # noqa: E402
from jaxt2i.models.attention import (dot_product_attention, pattern_mask,  # noqa: E402
                                     sparse_attention, splash_blocks)
from jaxt2i.parallel import partitioning  # noqa: E402

HEADS, HEAD_DIM, TEXT_LEN, KERNEL = 8, 64, 32, 11
GRIDS = ((16, 16), (32, 32))
PATTERNS = ("row", "column", "conv")
# FLOPs per query-key pair per head-dimension: forward QK^T and PV (2 multiply-adds); the
# backward recomputes QK^T and forms dP, dQ, dK, dV.
FLOPS_PER_PAIR = {"forward": 4, "forward + backward": 14}


def query_key_pairs(pattern: str, text_len: int, grid: tuple[int, int]) -> tuple[int, int]:
  """(dense, sparse) query-key pairs computed per (batch, head)."""
  height, width = grid
  length = text_len + height * width
  block_keys = {"row": width, "column": height,
                "conv": (min(KERNEL // 2, height - 1) + 1) * width}[pattern]
  return length ** 2, text_len ** 2 + height * width * (text_len + block_keys)


def alternate(fns: dict, repeats: int) -> dict[str, harness.Timing]:
  """Times each of `fns` (blocking callables) `repeats` times, interleaved, after one call."""
  for fn in fns.values():
    fn()
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      samples[name].append(time.perf_counter() - start)
  return {name: harness.Timing(statistics.median(s), min(s), max(s), repeats)
          for name, s in samples.items()}


def attention_part(repeats: int, batch: int, dtype: str) -> tuple[list[str], dict]:
  rows, data = [], {}
  for grid in GRIDS:
    length = TEXT_LEN + grid[0] * grid[1]
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal((batch, length, HEADS, HEAD_DIM)), dtype)
                  for _ in range(4))
    for pattern in PATTERNS:
      mask = pattern_mask(pattern, TEXT_LEN, grid, KERNEL)
      paths = {
          "dense": lambda q, k, v, mask=mask: dot_product_attention(q, k, v, mask=mask),
          "sparse": functools.partial(sparse_attention, pattern=pattern, text_len=TEXT_LEN,
                                      grid=grid, kernel=KERNEL)}
      dense_pairs, sparse_pairs = query_key_pairs(pattern, TEXT_LEN, grid)
      flop_ratio = dense_pairs / sparse_pairs
      key = f"{grid[0]}x{grid[1]}/{pattern}"
      data[key] = {"dense_pairs": dense_pairs, "sparse_pairs": sparse_pairs}
      for kind in ("forward", "forward + backward"):
        fns = {}
        for name, f in paths.items():
          if kind == "forward":
            jitted = jax.jit(f)
          else:
            jitted = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * g),
                                      argnums=(0, 1, 2)))
          fns[name] = lambda jitted=jitted: jax.block_until_ready(jitted(q, k, v))
        try:
          t = alternate(fns, repeats)
        except Exception as e:  # a backend refusing a shape: report it, time the rest
          print(f"{key} {kind} failed: {type(e).__name__}: {e}", flush=True)
          rows.append(f"| {TEXT_LEN} + {grid[0]}x{grid[1]} | {pattern} | {kind} | failed: "
                      f"{type(e).__name__} | | | | | |")
          continue
        speedup = t["dense"].median_s / t["sparse"].median_s
        flops = FLOPS_PER_PAIR[kind] * HEAD_DIM * batch * HEADS
        rows.append(
            f"| {TEXT_LEN} + {grid[0]}x{grid[1]} | {pattern} | {kind} | "
            f"{t['dense'].median_s * 1e3:.1f} | {t['sparse'].median_s * 1e3:.1f} | "
            f"{speedup:.2f}x | {flop_ratio:.2f}x | **{100 * speedup / flop_ratio:.0f}%** | "
            f"{flops * dense_pairs / t['dense'].median_s / 1e9:.0f} / "
            f"{flops * sparse_pairs / t['sparse'].median_s / 1e9:.0f} |")
        print(rows[-1], flush=True)
        data[key][kind] = {name: r.as_dict() for name, r in t.items()}
  return rows, data


def splash_ratios() -> str:
  """The splash kernel's block-level FLOP ratio for each benchmarked grid and pattern."""
  parts = []
  for grid in GRIDS:
    ratios = []
    for pattern in PATTERNS:
      kept, total = splash_blocks(pattern, TEXT_LEN, grid, KERNEL)
      ratios.append(f"{pattern} {total / kept:.2f}x")
    parts.append(f"{', '.join(ratios)} at {TEXT_LEN} + {grid[0]}x{grid[1]}")
  return "; ".join(parts)


def sampling_part(repeats: int) -> tuple[str, dict]:
  model = tr.Transformer(text_vocab=1024, image_vocab=8192, text_len=32, grid=(16, 16),
                         width=256, depth=4, num_heads=4)
  prompts, samples = 2, 4
  rng = np.random.default_rng(0)
  captions = np.arange(32)[None] < np.array([[12], [20]])[:prompts]  # 12 and 20 text tokens
  text = jnp.asarray(tr.pad_text(rng.integers(0, 1024, (prompts, 32)), captions, 1024))
  params = partitioning.unbox(jax.jit(model.init)(
      jax.random.key(0), text, jnp.zeros((prompts, 256), jnp.int32))["params"])
  tokens = prompts * samples * model.image_len
  result, compiled = {}, {}
  for use_cache in (True, False):
    run = jax.jit(functools.partial(tr.generate, model, num_samples=samples, top_k=64,
                                    use_cache=use_cache))
    compiled[use_cache], seconds = harness.compile_seconds(run, params, text, jax.random.key(1))
    result["cache" if use_cache else "recompute"] = {"compile_s": seconds}
  # Recomputing costs ~a forward pass per token: one timed run of it, several of the cache.
  for use_cache, n in ((True, repeats), (False, 1)):
    timing = harness.time_fn(
        lambda: jax.block_until_ready(compiled[use_cache](params, text, jax.random.key(1))),
        warmup=1 if use_cache else 0, repeats=n)
    result["cache" if use_cache else "recompute"].update(timing.as_dict())
  cached, recompute = result["cache"]["median_s"], result["recompute"]["median_s"]
  md = (f"`generate`, {prompts} prompts x {samples} samples = {tokens} image tokens, a "
        f"{model.depth}-layer {model.width}-wide model ({model.num_heads} heads, layers "
        f"{', '.join(model.patterns)}), 32 text + 16x16 image tokens, 8192 image codes, top-k 64, "
        "float32; the whole loop in one jit.\n\n"
        "| decoding | s per image batch | image tokens/s | compile s |\n|---|---|---|---|\n"
        f"| KV cache | {cached:.3f} | {tokens / cached:.0f} | {result['cache']['compile_s']:.1f} |\n"
        f"| recompute the stream every step | {recompute:.2f} | {tokens / recompute:.1f} | "
        f"{result['recompute']['compile_s']:.1f} |\n\n"
        f"**KV cache: {recompute / cached:.0f}x** the throughput of recomputing (goal: >= 10x).\n")
  print(md, flush=True)
  return md, result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--parts", nargs="+", choices=("attention", "sampling"),
                      default=["attention", "sampling"])
  parser.add_argument("--batch", type=int, default=None,
                      help="attention batch (default: 2 on CPUs, 16 on accelerators)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="attention dtype (default: float32 on CPUs, bfloat16 on accelerators)")
  parser.add_argument("--no_record", action="store_true",
                      help="print the results; leave RESULTS.md and results/ alone")
  args = parser.parse_args()

  batch = args.batch or (16 if harness.on_accelerator() else 2)
  dtype = args.dtype or ("bfloat16" if harness.on_accelerator() else "float32")
  data = {"load_average_before": os.getloadavg()[0], "batch": batch, "dtype": dtype}
  sections = []
  if "attention" in args.parts:
    rows, data["attention"] = attention_part(args.repeats, batch, dtype)
    sections.append(
        f"Self-attention over 32 text + image tokens, batch {batch}, {HEADS} heads of "
        f"{HEAD_DIM}, {dtype}, conv window {KERNEL}x{KERNEL}; the default backend (`auto`) on "
        f"both sides, jax {jax.__version__} on {jax.devices()[0].device_kind}. Medians of {args.repeats}, dense and sparse timed alternately; ms.\n\n"
        "| tokens | pattern | pass | dense masked | sparse | speed-up | FLOP ratio | "
        "realised | GFLOP/s dense / sparse |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\nRealised = speed-up / FLOP ratio (goal: at least 70%). "
        "The GFLOP/s column counts the pairs each path multiplies. On TPUs `auto` runs the "
        "splash kernel, which computes whole 128 x 128 blocks: its FLOP ratio against dense "
        "(blocks of the full logits / blocks it computes) is " + splash_ratios() + ".\n")
  if "sampling" in args.parts:
    md, data["sampling"] = sampling_part(args.repeats)
    sections.append(md)
  md = "\n".join(sections) + (
      f"\n1-minute load average before / after: {data['load_average_before']:.2f} / "
      f"{os.getloadavg()[0]:.2f}" + ("" if harness.on_accelerator() else
                                      " (2 cores; above 2 means other work shared the machine)")
      + ".\n")
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/sparse_attention.py" + "".join(
        f" --{k} {v}" for k, v in (("batch", args.batch), ("dtype", args.dtype)) if v)
    harness.record("sparse_attention", command, md, data)


if __name__ == "__main__":
  main()
