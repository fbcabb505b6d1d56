"""Attention backends of jaxt2i/models/attention.py against each other and PyTorch, on this CPU.

  python benchmarks/attention.py [--repeats 5] [--tokens 1024 4096] [--no_record]

Self-attention at Stable Diffusion 1.x's top U-Net level: 8 heads of 40 (320 channels),
batch 1 (2 with classifier-free guidance), 4096 tokens = a 64x64 latent (512 px images), and
1024 tokens (256 px). Forward, and forward + backward of sum(out * g). Backends: `einsum`
(jaxt2i's CPU path: heads-first, cache-sized steps, flash-style gradient), `xla`
(`jax.nn.dot_product_attention(implementation="xla")`, which materialises the logits), and
torch's `scaled_dot_product_attention` as the outside baseline. float32.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from jaxt2i.models.attention import dot_product_attention  # noqa: E402

HEADS, HEAD_DIM, BATCH = 8, 40, 2


def jax_fns(q, k, v, g, implementation):
  def attend(q, k, v):
    return dot_product_attention(q, k, v, implementation=implementation)

  forward = jax.jit(attend)
  backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), argnums=(0, 1, 2)))
  return {"forward": lambda: jax.block_until_ready(forward(q, k, v)),
          "forward + backward": lambda: jax.block_until_ready(backward(q, k, v))}


def torch_fns(q, k, v, g):
  import torch
  import torch.nn.functional as F
  tq, tk, tv, tg = (torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).contiguous()
                    for x in (q, k, v, g))

  def forward():
    with torch.no_grad():
      F.scaled_dot_product_attention(tq, tk, tv)

  def backward():
    a, b, c = (x.clone().requires_grad_(True) for x in (tq, tk, tv))
    (F.scaled_dot_product_attention(a, b, c) * tg).sum().backward()
  return {"forward": forward, "forward + backward": backward}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--no_record", action="store_true")
  args = parser.parse_args()
  try:
    import torch
    torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch = None

  rows, data = [], {"load_average_before": os.getloadavg()[0]}
  for tokens in args.tokens:
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal((BATCH, tokens, HEADS, HEAD_DIM)),
                              jnp.float32) for _ in range(4))
    fns = {"einsum": jax_fns(q, k, v, g, "einsum"), "xla": jax_fns(q, k, v, g, "xla")}
    if torch is not None:
      fns["torch"] = torch_fns(q, k, v, g)
    results = {}
    for kind in ("forward", "forward + backward"):
      results[kind] = {name: harness.time_fn(f[kind], warmup=1, repeats=args.repeats)
                       for name, f in fns.items()}
      t = {name: r.median_s for name, r in results[kind].items()}
      torch_cell = f"{t['torch']:.3f}" if "torch" in t else "n/a"
      vs_torch = f"{t['torch'] / t['einsum']:.2f}x" if "torch" in t else "n/a"
      rows.append(f"| {tokens} | {kind} | {t['einsum']:.3f} | {t['xla']:.3f} | {torch_cell} | "
                  f"**{t['xla'] / t['einsum']:.2f}x** | {vs_torch} |")
    data[str(tokens)] = {kind: {name: r.as_dict() for name, r in res.items()}
                         for kind, res in results.items()}

  md = (f"Self-attention, batch {BATCH}, {HEADS} heads of {HEAD_DIM}, float32; jax "
        f"{jax.__version__}" + (f", torch {torch.__version__} with {torch.get_num_threads()} "
                                "threads" if torch else "")
        + f". Medians of {args.repeats} after a warm-up call; seconds.\n\n"
        "| tokens | pass | einsum (ours) | xla | torch SDPA | xla / einsum | torch / einsum |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "`auto` picks `einsum` on CPU. Ratios above 1 mean the einsum path is faster.\n\n"
        f"1-minute load average before / after: {data['load_average_before']:.2f} / "
        f"{os.getloadavg()[0]:.2f} (2 cores; above 2 means other work shared the machine and "
        "slowed every backend).\n")
  if args.no_record:
    print(md)
  else:
    harness.record("attention", "python benchmarks/attention.py", md, data)


if __name__ == "__main__":
  main()
