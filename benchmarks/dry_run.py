"""Large-model dry run: an SD-1.5-sized U-Net and a 1B-parameter DALL-E transformer sharded
over 8 fake CPU devices without materialising them (jaxt2i/parallel/dry_run.py), with the
per-device memory of an AdamW training step from the compiled program's memory analysis.

  python benchmarks/dry_run.py [--models unet-sd15 unet-sd15-remat transformer-1b]
      [--strategies dp fsdp fsdp_tp]
      [--batch 8] [--dtype bfloat16] [--no_record]

Meshes: dp = data 8; fsdp = fsdp 8; fsdp_tp = fsdp 4 x tensor 2. The batch is global.
Recorded as `dry_run` in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import harness  # noqa: E402
from jaxt2i.models import transformer as tr  # noqa: E402
from jaxt2i.models.unet import UNet, variant as unet_variant  # noqa: E402
from jaxt2i.parallel import dry_run, mesh as mesh_lib, partitioning  # noqa: E402

MESHES = {"dp": {"data": 8, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
          "fsdp_tp": {"data": 1, "fsdp": 4, "tensor": 2}}


def unet_plan(model: UNet, batch: int, size: int, tokens: int):
  x = jax.ShapeDtypeStruct((batch, size, size, model.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  c = jax.ShapeDtypeStruct((batch, tokens, model.cross_attention_dim), jnp.float32)

  def init():
    return model.init(jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32),
                      jnp.zeros(c.shape))["params"]

  def loss(params, b):
    out = model.apply({"params": params}, b["x"], b["t"], b["c"])
    return jnp.mean((out - b["x"]) ** 2)
  return init, loss, {"x": x, "t": t, "c": c}


def transformer_plan(model: tr.Transformer, batch: int):
  text = jax.ShapeDtypeStruct((batch, model.text_len), jnp.int32)
  image = jax.ShapeDtypeStruct((batch, model.image_len), jnp.int32)

  def init():
    return model.init(jax.random.key(0), jnp.zeros(text.shape, jnp.int32),
                      jnp.zeros(image.shape, jnp.int32))["params"]

  def loss(params, b):
    logits = model.apply({"params": params}, b["text"], b["image"])
    return tr.loss(*logits, b["text"], b["image"])[0]
  return init, loss, {"text": text, "image": image}


def models(dtype, batch: int) -> dict:
  return {
      "unet-sd15": lambda: unet_plan(unet_variant("sd1", dtype=dtype), batch, 64, 77),
      "unet-sd15-remat": lambda: unet_plan(unet_variant("sd1", dtype=dtype, remat_policy="full"),
                                           batch, 64, 77),
      "unet-tiny": lambda: unet_plan(unet_variant("tiny", dtype=dtype), batch, 16, 8),
      "transformer-1b": lambda: transformer_plan(tr.Transformer(
          text_vocab=16384, text_len=64, grid=(32, 32), width=2048, depth=20, num_heads=16,
          dtype=dtype, remat=True), batch),
      "transformer-tiny": lambda: transformer_plan(tr.variant("tiny", dtype=dtype), batch),
  }


def plan(name: str, strategy: str, batch: int, dtype) -> dict:
  init, loss, inputs = models(dtype, batch)[name]()
  mesh = mesh_lib.create_mesh(MESHES[strategy], jax.devices()[:8])
  rules = partitioning.logical_axis_rules(strategy)
  return dry_run.train_step_memory(init, loss, inputs, mesh, rules)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["unet-sd15", "transformer-1b"],
                      choices=sorted(models(jnp.float32, 1)))
  parser.add_argument("--strategies", nargs="+", default=["dp", "fsdp", "fsdp_tp"],
                      choices=sorted(MESHES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--no_record", action="store_true")
  args = parser.parse_args()
  if jax.device_count() < 8:
    sys.exit(f"needs 8 devices, found {jax.device_count()}")
  gib = 2.0 ** 30
  rows, data = [], {}
  for name in args.models:
    for strategy in args.strategies:
      r = plan(name, strategy, args.batch, jnp.dtype(args.dtype))
      data[f"{name}/{strategy}"] = r
      m = r["memory"]
      rows.append(
          f"| {name} | {strategy} {'x'.join(str(v) for v in r['mesh'].values())} | "
          f"{r['params'] / 1e6:,.0f}M | {r['param_bytes_per_device'] / gib:.2f} | "
          f"{r['param_bytes'] / r['param_bytes_per_device']:.1f}x | "
          f"{r['optimizer_bytes_per_device'] / gib:.2f} | {m.get('argument', 0) / gib:.2f} | "
          f"{m.get('temp', 0) / gib:.2f} | {m.get('peak_estimate', 0) / gib:.2f} | "
          f"{r['compile_s']:.0f} |")
      print(rows[-1], flush=True)
  md = (f"AdamW training step, global batch {args.batch}, {args.dtype} compute (float32 "
        "params and optimizer state), planned on 8 fake CPU devices from ShapeDtypeStructs "
        "only. unet-sd15: the SD 1.5 U-Net, 64x64x4 latents, 77 text tokens (-remat: every "
        "resnet and transformer block rematerialised, remat_policy='full'); transformer-1b: "
        "64 text + 32x32 image tokens, width 2048, 20 layers of 16 heads, rematerialised "
        "blocks. Per-device GiB from the arrays' shards (params, optimizer) and from XLA's "
        "memory analysis of the compiled step (arguments, temporaries, peak = arguments + "
        "outputs + temporaries - aliased).\n\n"
        "| model | mesh | params | params/device GiB | params reduced | optimizer/device GiB | "
        "arguments GiB | temp GiB | peak GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n")
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/dry_run.py" + "".join(
        f" --{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "no_record" and v != parser.get_default(k))
    harness.record("dry_run", command, md, data)


if __name__ == "__main__":
  main()
