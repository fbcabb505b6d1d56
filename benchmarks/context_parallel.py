"""Ring attention (jaxt2i/parallel/context_parallel.py) against plain `jit` attention, with
the same sequence-sharded inputs, on 8 fake CPU devices (XLA_FLAGS is set below, before jax
is imported).

  python benchmarks/context_parallel.py [--repeats 3] [--cases 1056:causal 4096:full]
      [--memory_cases 16384:full] [--no_record]

Self-attention, batch 2, 8 heads of 40, float32, over 32 text + 1024 image tokens (DALL-E's
stream at a 32 x 32 grid; causal) and 4096 tokens (a 64 x 64 latent, the SD U-Net's top
level; not causal), timed; and 16384 tokens, compiled for its memory but not run. q, k, v
are [B, L, H, D] with L split over every device (8 on a CPU) along the mesh axis `context`.
Compared:

  ring    `ring_attention(..., mesh=mesh, axis="context")`: K/V blocks passed around the ring.
  einsum  `jax.jit(dot_product_attention)` on jaxt2i's CPU backend (chunked, heads-first),
          leaving the partitioning to XLA's SPMD partitioner.
  xla     the same with implementation="xla" (`jax.nn.dot_product_attention`), which forms
          the logits in one piece.

For each: the compiled forward + backward step's per-device temporary memory
(`memory_analysis().temp_size_in_bytes`, inputs and outputs excluded), the collectives in
its HLO, and its time (median of `--repeats`, the backends timed alternately so that load
from other work falls on all of them). The 8 "devices" share this machine's cores, so the
times add up every device's work: they compare total work and overheads, not the wall
time of a real 8-chip ring, where the devices run in parallel and the transfers overlap the
matmuls. Recorded as `context_parallel`.
"""

from __future__ import annotations

import os

# 8 CPU devices, set before jax is imported; accelerators ignore it.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import harness  # noqa: E402
from jaxt2i.models.attention import dot_product_attention  # noqa: E402
from jaxt2i.parallel.context_parallel import ring_attention  # noqa: E402

BATCH, HEADS, HEAD_DIM = 2, 8, 40
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")


def attention_fns(mesh: Mesh, length: int, causal: bool) -> dict:
  def dense(implementation):
    def attend(q, k, v):
      # Built in the program rather than captured: a [16384, 16384] constant would be 256 MiB.
      mask = jnp.tril(jnp.ones((length, length), bool)) if causal else None
      return dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return attend
  return {
      "ring": lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis="context",
                                             causal=causal),
      "einsum": dense("einsum"),
      "xla": dense("xla"),
  }


def parse_cases(parser, flag: str, values) -> list[tuple[int, bool]]:
  cases = []
  for case in values:
    length, _, kind = case.partition(":")
    if not length.isdigit() or kind not in ("causal", "full"):
      parser.error(f"{flag} entry {case!r}: give TOKENS:causal or TOKENS:full")
    cases.append((int(length), kind == "causal"))
  return cases


def collectives(hlo: str) -> str:
  """Collective ops of a compiled program's HLO and how many of them sit inside a loop (and
  so run once per iteration), e.g. "all-gather x2, all-reduce x3 (3 in loops)"."""
  parts = []
  for op in COLLECTIVES:
    lines = [line for line in hlo.splitlines()
             if re.search(rf"= \S+ {op}(?:-start)?\(", line)]
    if lines:
      looped = sum("/while/body" in line for line in lines)
      parts.append(f"{op} x{len(lines)}" + (f" ({looped} in loops)" if looped else ""))
  return ", ".join(parts) or "none"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cases", nargs="+", default=["1056:causal", "4096:full"],
                      help="TOKENS:causal or TOKENS:full per timed case")
  parser.add_argument("--memory_cases", nargs="*", default=["16384:full"],
                      help="cases compiled for their memory, not run")
  parser.add_argument("--no_record", action="store_true")
  args = parser.parse_args()
  devices = jax.devices()
  mesh = Mesh(np.asarray(devices).reshape(len(devices)), ("context",))
  sharding = NamedSharding(mesh, PartitionSpec(None, "context"))
  rows, data = [], {"load_average_before": os.getloadavg()[0], "devices": len(devices)}

  cases = parse_cases(parser, "--cases", args.cases)
  memory_cases = parse_cases(parser, "--memory_cases", args.memory_cases)

  def compile_all(length, causal, example):
    """{backend: compiled forward + backward step}, and each one's memory / collectives."""
    steps, info = {}, {}
    for name, attend in attention_fns(mesh, length, causal).items():
      grad = jax.jit(jax.grad(lambda q, k, v, g, f=attend: jnp.sum(f(q, k, v) * g),
                              argnums=(0, 1, 2)),
                     in_shardings=(sharding,) * 4, out_shardings=(sharding,) * 3)
      compiled, seconds = harness.compile_seconds(grad, *example)
      steps[name] = compiled
      info[name] = {"temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2 ** 20,
                    "compile_s": seconds, "collectives": collectives(compiled.as_text())}
      print(f"{length} tokens, {name}: {info[name]}", flush=True)
    return steps, info

  for length, causal in cases:
    rng = np.random.default_rng(0)
    q, k, v, g = (jax.device_put(jnp.asarray(rng.standard_normal(
        (BATCH, length, HEADS, HEAD_DIM)), jnp.float32), sharding) for _ in range(4))
    steps, info = compile_all(length, causal, (q, k, v, g))
    out = {name: step(q, k, v, g) for name, step in steps.items()}
    error = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(out["ring"], out["einsum"]))
    samples = {name: [] for name in steps}
    for _ in range(args.repeats):
      for name, step in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v, g))
        samples[name].append(time.perf_counter() - start)
    for name in steps:
      info[name]["step_s"] = statistics.median(samples[name])
      info[name]["samples_s"] = samples[name]
      rows.append(f"| {length} | {'causal' if causal else 'full'} | {name} | "
                  f"{info[name]['temp_mib']:.1f} | {info[name]['step_s']:.3f} | "
                  f"{info[name]['collectives']} |")
      print(rows[-1], flush=True)
    data[str(length)] = {"causal": causal, "max_grad_difference_ring_vs_einsum": error,
                         **info}
    print(f"{length} tokens: largest |ring - einsum| gradient difference {error:.2e}",
          flush=True)
  for length, causal in memory_cases:
    shape = jax.ShapeDtypeStruct((BATCH, length, HEADS, HEAD_DIM), jnp.float32,
                                 sharding=sharding)
    _, info = compile_all(length, causal, (shape,) * 4)
    for name in info:
      rows.append(f"| {length} | {'causal' if causal else 'full'} | {name} | "
                  f"{info[name]['temp_mib']:.1f} | not run | {info[name]['collectives']} |")
      print(rows[-1], flush=True)
    data[f"{length}_compiled_only"] = {"causal": causal, **info}

  md = (f"Self-attention forward + backward (gradients of sum(out * g) w.r.t. q, k, v), "
        f"batch {BATCH}, {HEADS} heads of {HEAD_DIM}, float32, q / k / v sharded "
        f"P(None, 'context') over {len(devices)} {devices[0].platform.upper()} devices; jax "
        f"{jax.__version__}. Temp: the compiled step's per-device temporaries (MiB, inputs "
        f"and outputs excluded). Step: median of {args.repeats} seconds, all devices "
        "sharing the machine's cores, so it sums every device's work. Collectives: the ops "
        "in the compiled program; those in loops run once per iteration (the ring's once per "
        "ring step: one neighbour-to-neighbour K/V block, in the backward also its dK/dV "
        "sums).\n\n"
        "| tokens | attention | backend | temp MiB / device | step s | collectives in the "
        "step |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        + "Ring temporaries / plain jit's: " + "; ".join(
            f"{n}{' (compiled only)' if key.endswith('only') else ''}: "
            f"{data[key]['ring']['temp_mib'] / data[key]['einsum']['temp_mib']:.2f}x einsum, "
            f"{data[key]['ring']['temp_mib'] / data[key]['xla']['temp_mib']:.3f}x xla"
            for key, n in [(str(n), n) for n, _ in cases]
            + [(f"{n}_compiled_only", n) for n, _ in memory_cases]) + ".\n\n"
        + "Largest gradient difference ring vs einsum: " + ", ".join(
            f"{data[str(n)]['max_grad_difference_ring_vs_einsum']:.1e} at {n} tokens"
            for n, _ in cases)
        + f". 1-minute load average before / after: {data['load_average_before']:.2f} / "
        f"{os.getloadavg()[0]:.2f}.\n")
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/context_parallel.py" + (
        f" --repeats {args.repeats}" if args.repeats != parser.get_default("repeats") else ""
    ) + "".join(
        f" --{flag} {' '.join(getattr(args, flag))}" for flag in ("cases", "memory_cases")
        if getattr(args, flag) != parser.get_default(flag))
    harness.record("context_parallel", command, md, data)


if __name__ == "__main__":
  main()
