"""DALL-E transformer training throughput and model FLOP utilisation (jaxt2i/models/transformer.py).

  python benchmarks/transformer.py [--preset cpu|gpu] [--layouts paper dense] [--dtype ...]
      [--batch N] [--repeats 5] [--attention auto] [--depth N] [--scan] [--no_record]

One training step (forward over text + image tokens, the paper's 1/8 - 7/8 loss, backward,
AdamW update; one jitted function with params and optimizer state donated) of the decoder
transformer at a preset size:

  cpu  32 text + 16x16 image tokens, width 256, 4 layers of 4 heads, batch 8, float32.
  gpu  64 text + 32x32 image tokens (the paper's grid), width 2048, 16 layers of 32 heads
       (~0.8B parameters), batch 16, bfloat16 compute with float32 parameters.

for each layer layout: `paper` (the paper's row / column / conv sparse attention pattern
cycle) and `dense` (causal attention over the whole stream in every layer).

Reported: step time, tokens/s, and model FLOP utilisation (MFU) against the matmul ceiling
measured in the same run (harness.matmul_ceiling: float32 on CPUs, bfloat16 on accelerators).
Model FLOPs are counted analytically: 6 x (matmul parameters used per token) per token for
the dense layers and the text / image heads, plus 12 x head_dim x heads per query-key pair
that the layer's mask keeps (forward QK^T and PV, twice that backward), so a sparse layer is
credited only with the pairs it needs. XLA's cost_analysis FLOPs of the lowered step (what
the program executes, masked work included) are shown beside them. Recorded as
`transformer_train` (on a GPU, `transformer_train_gpu`) in benchmarks/RESULTS.md.

--scan measures every layout twice, unrolled and with scan_layers (nn.scan over the pattern's
period), for compile time and step time side by side; recorded as `transformer_scan`.
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
import optax  # noqa: E402

import harness  # noqa: E402
from jaxt2i.models import transformer as tr  # noqa: E402
from jaxt2i.models.attention import pattern_mask  # noqa: E402
from jaxt2i.parallel import partitioning  # noqa: E402

PRESETS = {
    "cpu": {"model": dict(text_vocab=1024, text_len=32, grid=(16, 16), width=256, depth=4,
                          num_heads=4), "batch": 8, "dtype": "float32"},
    "gpu": {"model": dict(text_vocab=16384, text_len=64, grid=(32, 32), width=2048, depth=16,
                          num_heads=32), "batch": 16, "dtype": "bfloat16"},
}


def model_flops(model: tr.Transformer, batch: int) -> dict[str, float]:
  """Analytic training FLOPs of one step (forward + backward = 3 x forward)."""
  d, text_len, image_len = model.width, model.text_len, model.image_len
  length = text_len + image_len
  per_token_block = (4 + 2 * model.mlp_ratio) * d * d     # qkv, output, MLP in and out
  dense = 2 * batch * length * model.depth * per_token_block
  heads = 2 * batch * ((text_len - 1) * (model.text_vocab + text_len) * d
                       + image_len * model.image_vocab * d)
  pairs = sum(int(np.asarray(pattern_mask(p, text_len, model.grid, model.conv_kernel)).sum())
              for p in model.patterns)
  attention = 4 * d * batch * pairs                       # QK^T and PV, all heads
  return {"dense_layers": 3.0 * dense, "heads": 3.0 * heads, "attention": 3.0 * attention,
          "total": 3.0 * (dense + heads + attention), "kept_pairs": pairs}


def train_step_fn(model, optimizer):
  def step(params, opt_state, text, image):
    def loss_fn(p):
      text_logits, image_logits = model.apply({"params": p}, text, image)
      return tr.loss(text_logits, image_logits, text, image)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def measure(model: tr.Transformer, batch: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(0, model.text_vocab, (batch, model.text_len)), jnp.int32)
  image = jnp.asarray(rng.integers(0, model.image_vocab, (batch, model.image_len)), jnp.int32)
  params = partitioning.unbox(jax.jit(model.init)(jax.random.key(0), text, image)["params"])
  n_params = sum(x.size for x in jax.tree.leaves(params))
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  state = {"params": params, "opt": jax.jit(optimizer.init)(params)}
  step = train_step_fn(model, optimizer)
  xla_flops = harness.xla_flops(jax.jit(step), state["params"], state["opt"], text, image)
  compiled, compile_s = harness.compile_seconds(
      jax.jit(step, donate_argnums=(0, 1)), state["params"], state["opt"], text, image)

  def once():
    state["params"], state["opt"], loss = compiled(state["params"], state["opt"], text, image)
    jax.block_until_ready(loss)
    return loss

  timing = harness.time_fn(once, warmup=2, repeats=repeats)
  loss = float(once())
  flops = model_flops(model, batch)
  tokens = batch * (model.text_len + model.image_len)
  return {"params": n_params, "compile_s": compile_s, "timing": timing.as_dict(),
          "tokens_per_s": tokens / timing.median_s, "model_flops": flops,
          "xla_flops": xla_flops, "final_loss": loss}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS),
                      default="gpu" if harness.on_accelerator() else "cpu")
  parser.add_argument("--layouts", nargs="+", choices=("paper", "dense"),
                      default=["paper", "dense"])
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="compute dtype (default: the preset's)")
  parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
  parser.add_argument("--attention", default="auto", help="Transformer.attention_implementation")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--depth", type=int, default=None, help="default: the preset's")
  parser.add_argument("--scan", action="store_true",
                      help="also measure each layout with scan_layers=True")
  parser.add_argument("--no_record", action="store_true", help="print only")
  args = parser.parse_args()
  preset = {**PRESETS[args.preset]}
  preset["model"] = {**preset["model"], **({"depth": args.depth} if args.depth else {})}
  dtype = args.dtype or preset["dtype"]
  batch = args.batch or preset["batch"]

  load_before = os.getloadavg()[0]
  ceiling = harness.matmul_ceiling()
  print(f"matmul ceiling ({ceiling['dtype']}): {ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s",
        flush=True)
  results, rows = {}, []
  runs = [(layout, scan) for layout in args.layouts for scan in ((False, True) if args.scan
                                                                  else (False,))]
  for layout, scan in runs:
    depth = preset["model"]["depth"]
    patterns = (tr.paper_attention_patterns(depth) if layout == "paper"
                else ("dense",) * depth)
    attention = args.attention
    while True:
      model = tr.Transformer(**preset["model"], attention_patterns=patterns,
                             attention_implementation=attention, dtype=jnp.dtype(dtype),
                             scan_layers=scan)
      try:
        r = measure(model, batch, args.repeats)
        break
      except Exception as e:  # e.g. a backend refusing a mask: say so, fall back to xla
        print(f"{layout} with attention {attention!r} failed: {type(e).__name__}: {e}",
              flush=True)
        if attention in ("xla", "einsum"):
          raise
        attention = "xla"
    r.update(patterns=list(patterns), attention=attention, scan_layers=scan,
             scan_plan=[list(model.plan[0]), model.plan[1]])
    name = f"{layout}, scanned" if scan else layout
    results[name] = r
    step = r["timing"]["median_s"]
    mfu = r["model_flops"]["total"] / step / ceiling["flops_per_s"]
    rows.append(f"| {name} ({', '.join(sorted(set(patterns)))}; `{attention}`) | "
                f"{step * 1e3:.1f} | "
                f"{r['tokens_per_s']:,.0f} | {r['model_flops']['total'] / 1e12:.3g} | "
                f"{r['xla_flops'] / 1e12:.3g} | {r['model_flops']['total'] / step / 1e12:.3g} | "
                f"**{mfu:.0%}** | {r['compile_s']:.1f} |")
    print(rows[-1], flush=True)
  first = next(iter(results.values()))
  m = preset["model"]
  md = (f"Preset `{args.preset}`: {m['text_len']} text + {m['grid'][0]}x{m['grid'][1]} image "
        f"tokens, width {m['width']}, {m['depth']} layers of {m['num_heads']} heads, text vocab "
        f"{m['text_vocab']}, 8192 image codes, {first['params'] / 1e6:.1f}M parameters; batch "
        f"{batch}; {dtype} compute, float32 parameters, AdamW; attention `{args.attention}`; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}. Medians of {args.repeats} "
        "steps after 2 warm-up steps.\n\n"
        "| layers (attention) | ms/step | tokens/s | model TFLOP/step | XLA TFLOP/step | model TFLOP/s | "
        "MFU | compile s |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"MFU = model FLOPs / step time / the measured {ceiling['dtype']} matmul ceiling, "
        f"{ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s here (square matmuls " + ", ".join(
            f"{n}: {r / 1e12:.3g}" for n, r in ceiling["by_size"].items()) + " TFLOP/s). Model "
        "FLOPs count the attention pairs each layer's mask keeps; XLA's count includes what the "
        "program computes and throws away.\n\n"
        f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}.\n")
  data = {"preset": args.preset, "dtype": dtype, "batch": batch, "attention": args.attention,
          "matmul_ceiling": ceiling, "layouts": results}
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/transformer.py" + "".join(
        f" --{k} {v}" for k, v in (("preset", args.preset), ("dtype", args.dtype),
                                   ("batch", args.batch), ("attention", args.attention),
                                   ("depth", args.depth))
        if v is not None and v != parser.get_default(k)) + (" --scan" if args.scan else "")
    harness.record("transformer_scan" if args.scan else "transformer_train", command, md, data)


if __name__ == "__main__":
  main()
