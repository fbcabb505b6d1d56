"""Attention backends of jaxt2i/models/attention.py against each other and PyTorch.

  python benchmarks/attention.py [--repeats 5] [--tokens 1024 4096] [--dtype float32]
      [--no_record]

Self-attention at Stable Diffusion 1.x's top U-Net level: 8 heads of 40 (320 channels),
batch 1 (2 with classifier-free guidance), 4096 tokens = a 64x64 latent (512 px images), and
1024 tokens (256 px). Forward, and forward + backward of sum(out * g). Backends: `einsum`
(jaxt2i's CPU path: heads-first, cache-sized steps, flash-style gradient), `xla`
(`jax.nn.dot_product_attention(implementation="xla")`, which materialises the logits), and
torch's `scaled_dot_product_attention` as the outside baseline; on a GPU also `cudnn`
(`jax.nn.dot_product_attention(implementation="cudnn")`, flash attention; bfloat16 / float16
only), with torch on CUDA. Recorded as `attention` (on a GPU, `attention_gpu`).
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
  cuda = harness.on_accelerator() and torch.cuda.is_available()
  dtype = getattr(torch, str(q.dtype))
  tq, tk, tv, tg = (torch.from_numpy(np.array(x, np.float32)).permute(0, 2, 1, 3).contiguous()
                    .to("cuda" if cuda else "cpu", dtype) for x in (q, k, v, g))
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def forward():
    with torch.no_grad():
      F.scaled_dot_product_attention(tq, tk, tv)
    sync()

  def backward():
    a, b, c = (x.clone().requires_grad_(True) for x in (tq, tk, tv))
    (F.scaled_dot_product_attention(a, b, c) * tg).sum().backward()
    sync()
  return {"forward": forward, "forward + backward": backward}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="default: float32 on CPUs, bfloat16 on accelerators")
  parser.add_argument("--no_record", action="store_true")
  args = parser.parse_args()
  dtype = args.dtype or ("bfloat16" if harness.on_accelerator() else "float32")
  try:
    import torch
    torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch = None
  backends = ["einsum", "xla"]
  if harness.on_accelerator() and dtype != "float32":
    backends.append("cudnn")

  rows, data = [], {"load_average_before": os.getloadavg()[0], "dtype": dtype}
  for tokens in args.tokens:
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal((BATCH, tokens, HEADS, HEAD_DIM)),
                              dtype) for _ in range(4))
    fns = {name: jax_fns(q, k, v, g, name) for name in backends}
    if torch is not None:
      fns["torch"] = torch_fns(q, k, v, g)
    results = {}
    for kind in ("forward", "forward + backward"):
      results[kind] = {}
      for name, f in fns.items():
        try:
          results[kind][name] = harness.time_fn(f[kind], warmup=1, repeats=args.repeats)
        except Exception as e:  # e.g. cudnn refusing a shape: report it, time the rest
          print(f"{name} {kind} at {tokens} tokens failed: {type(e).__name__}: {e}",
                flush=True)
      t = {name: r.median_s for name, r in results[kind].items()}
      cells = " | ".join(f"{t[n]:.4f}" if n in t else "failed" for n in fns)
      fastest = min(t, key=t.get)
      rows.append(f"| {tokens} | {kind} | {cells} | {fastest} | " + " | ".join(
          f"{t[n] / t['einsum']:.2f}x" if n in t else "-" for n in fns if n != "einsum") + " |")
      print(rows[-1], flush=True)
    data[str(tokens)] = {kind: {name: r.as_dict() for name, r in res.items()}
                         for kind, res in results.items()}

  names = list(fns)
  labels = {"einsum": "einsum (ours)", "torch": "torch SDPA"}
  md = (f"Self-attention, batch {BATCH}, {HEADS} heads of {HEAD_DIM}, {dtype}; jax "
        f"{jax.__version__} on {jax.devices()[0].device_kind}"
        + (f", torch {torch.__version__}" + (" on CUDA" if harness.on_accelerator() else
                                             f" with {torch.get_num_threads()} threads")
           if torch else "")
        + f". Medians of {args.repeats} after a warm-up call; seconds.\n\n"
        "| tokens | pass | " + " | ".join(labels.get(n, n) for n in names) + " | fastest | "
        + " | ".join(f"{n} / einsum" for n in names if n != "einsum") + " |\n|---|---|"
        + "---|" * (2 * len(names)) + "\n" + "\n".join(rows) + "\n\n"
        "`auto` picks `einsum` on CPU and `cudnn` on GPUs where it applies (else `xla`). "
        "Ratios above 1 mean the einsum path is faster.\n\n"
        f"1-minute load average before / after: {data['load_average_before']:.2f} / "
        f"{os.getloadavg()[0]:.2f}" + ("" if harness.on_accelerator() else
                                       " (2 cores; above 2 means other work shared the machine "
                                       "and slowed every backend)") + ".\n")
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/attention.py" + (f" --dtype {args.dtype}" if args.dtype else "")
    harness.record("attention", command, md, data)


if __name__ == "__main__":
  main()
