"""U-Net step times: jaxt2i's Flax UNet against diffusers' PyTorch UNet2DConditionModel.

  python benchmarks/unet.py [--repeats 5] [--tokens 77] [--attention auto] [--no_record]

A latent-diffusion U-Net of SD1 shape at CPU size: block_out_channels (64, 128, 256),
layers_per_block 2, cross-attention in the two upper resolutions (8 heads, SD1's
`attention_head_dim`), cross_attention_dim 256, 4-channel 32x32 latents, batch 8, 77 text
tokens (CLIP's length). Both frameworks get the same weights (diffusers' random init,
converted) and the same inputs, float32, on this CPU (torch with as many threads as cores):

  train step     forward + MSE to the noise + backward + Adam (lr 1e-4) update; ours is one
                 jitted function with params and optimizer state donated.
  sampling step  forward only (torch.inference_mode; jitted apply).

Reported: medians (and minima) of `--repeats` timings after 2 warm-up calls, the two
frameworks alternating step by step so that load from other processes on a shared machine
hits both alike; the ratio ours / PyTorch of the medians (and of the minima, steadier when
the machine is busy); the train step's compile time and XLA's cost_analysis FLOPs. Recorded
as `unet_step` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import harness  # noqa: E402
from jaxt2i.convert import diffusers_unet  # noqa: E402

CONFIG = {
    "block_out_channels": (64, 128, 256), "layers_per_block": 2, "cross_attention_dim": 256,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 32,
}
LEARNING_RATE = 1e-4


def make_inputs(batch: int, tokens: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"sample": rng.standard_normal((batch, 32, 32, 4), np.float32),
          "timesteps": rng.integers(0, 1000, batch).astype(np.int32),
          "text": rng.standard_normal((batch, tokens, CONFIG["cross_attention_dim"]),
                                      np.float32),
          "noise": rng.standard_normal((batch, 32, 32, 4), np.float32)}


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def jax_steps(model, params, inputs) -> tuple[dict, dict]:
  """The jitted train and sampling steps as blocking no-argument callables, and their
  compile times and FLOPs."""
  sample, timesteps, text, noise = (jnp.asarray(inputs[k])
                                    for k in ("sample", "timesteps", "text", "noise"))
  optimizer = optax.adam(LEARNING_RATE)

  def train_step(params, opt_state, sample, timesteps, text, noise):
    def loss_fn(p):
      return jnp.mean((model.apply({"params": p}, sample, timesteps, text) - noise) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = {"params": jax.tree.map(jnp.asarray, params)}
  state["opt"] = optimizer.init(state["params"])
  train, train_compile_s = harness.compile_seconds(
      jax.jit(train_step, donate_argnums=(0, 1)), state["params"], state["opt"], sample,
      timesteps, text, noise)
  forward, sample_compile_s = harness.compile_seconds(
      jax.jit(model.apply), {"params": state["params"]}, sample, timesteps, text)

  def train_once():
    state["params"], state["opt"], loss = train(state["params"], state["opt"], sample,
                                                timesteps, text, noise)
    jax.block_until_ready(loss)

  def sample_once():
    jax.block_until_ready(forward({"params": state["params"]}, sample, timesteps, text))

  info = {"train_compile_s": train_compile_s, "sample_compile_s": sample_compile_s,
          "train_flops": flops_of(train), "sample_flops": flops_of(forward)}
  return {"train": train_once, "sample": sample_once}, info


def torch_steps(reference, inputs) -> dict:
  """diffusers' train and sampling steps on the same inputs (NCHW)."""
  import torch
  to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  sample, noise = to_nchw(inputs["sample"]), to_nchw(inputs["noise"])
  timesteps = torch.from_numpy(inputs["timesteps"].astype(np.int64))
  text = torch.from_numpy(inputs["text"])
  optimizer = torch.optim.Adam(reference.parameters(), lr=LEARNING_RATE)
  reference.train()  # dropout is 0: the same function as eval mode

  def train_once():
    optimizer.zero_grad(set_to_none=True)
    out = reference(sample, timesteps, text).sample
    torch.nn.functional.mse_loss(out, noise).backward()
    optimizer.step()

  def sample_once():
    with torch.inference_mode():
      reference(sample, timesteps, text)

  return {"train": train_once, "sample": sample_once}


def time_interleaved(fns: dict, warmup: int, repeats: int) -> dict:
  """harness.time_fn for several callables at once, alternating them (and their order) on
  every repeat, so that a busy patch of a shared machine hits all of them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  samples = {name: [] for name in fns}
  for r in range(repeats):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      samples[name].append(harness.time_fn(fns[name], warmup=0, repeats=1).median_s)
  return {name: harness.Timing(statistics.median(v), min(v), max(v), repeats)
          for name, v in samples.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=77)
  parser.add_argument("--attention", default="auto", help="UNet.attention_implementation")
  parser.add_argument("--no_record", action="store_true", help="print only")
  args = parser.parse_args()

  import diffusers
  import torch
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  reference = diffusers.UNet2DConditionModel(**CONFIG)
  with tempfile.TemporaryDirectory() as tmp:
    reference.save_pretrained(tmp)
    model, params = diffusers_unet.load_diffusers_unet(
        tmp, attention_implementation=args.attention)
  inputs = make_inputs(args.batch, args.tokens)
  n_params = sum(p.numel() for p in reference.parameters())

  load_before = os.getloadavg()[0]
  ceiling = harness.matmul_ceiling()
  ours_fns, info = jax_steps(model, params, inputs)
  theirs_fns = torch_steps(reference, inputs)
  ours, theirs = {}, {}
  for step in ("train", "sample"):
    timing = time_interleaved({"ours": ours_fns[step], "theirs": theirs_fns[step]},
                              warmup=2, repeats=args.repeats)
    ours[step], theirs[step] = timing["ours"], timing["theirs"]
  load_after = os.getloadavg()[0]

  rows = []
  for step, label in (("train", "train (fwd + bwd + Adam)"), ("sample", "sampling (forward)")):
    a, b = ours[step], theirs[step]
    rows.append(f"| {label} | {a.median_s:.3f} ({a.min_s:.3f}) | {b.median_s:.3f} "
                f"({b.min_s:.3f}) | **{a.median_s / b.median_s:.2f}x** "
                f"({a.min_s / b.min_s:.2f}x) |")
  gflops = info["train_flops"] / 1e9
  md = (f"SD1-shaped U-Net, block_out_channels {CONFIG['block_out_channels']}, "
        f"layers_per_block 2, 8 heads, cross_attention_dim 256, {n_params / 1e6:.1f}M params; "
        f"batch {args.batch} of 4x32x32 latents, {args.tokens} text tokens; float32; "
        f"attention `{args.attention}`; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, diffusers "
        f"{diffusers.__version__}. Medians (minima) of {args.repeats} repeats after 2 warm-up "
        "calls, the two frameworks alternating.\n\n"
        "| step | jaxt2i s/step | PyTorch s/step | ours / PyTorch (of minima) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        f"Train step: compile {info['train_compile_s']:.1f} s, XLA cost_analysis "
        f"{gflops:.1f} GFLOP ({gflops / ours['train'].median_s:.0f} GFLOP/s at the median); "
        f"sampling step {info['sample_flops'] / 1e9:.1f} GFLOP, compile "
        f"{info['sample_compile_s']:.1f} s. Goal: ours <= 1.0x PyTorch.\n\n"
        f"Model FLOP utilisation: the measured XLA float32 matmul ceiling of this machine is "
        f"{ceiling['flops_per_s'] / 1e9:.0f} GFLOP/s (best of square matmuls "
        f"{', '.join(f'{n}: {r / 1e9:.0f}' for n, r in ceiling['by_size'].items())}); the "
        f"train step runs at {gflops / ours['train'].median_s:.0f} GFLOP/s, "
        f"**{info['train_flops'] / ours['train'].median_s / ceiling['flops_per_s']:.0%} of it** "
        f"(sampling step {info['sample_flops'] / ours['sample'].median_s / ceiling['flops_per_s']:.0%}).\n\n"
        f"1-minute load average before / after: {load_before:.2f} / {load_after:.2f} (this "
        "run's own threads included). Other processes on the 2 cores slow both frameworks, "
        "PyTorch's OpenMP threads far more than XLA's work-stealing pool, so a loaded run "
        "flatters the ratio; trust runs with load near 2.\n")
  data = {"config": {**CONFIG, "batch": args.batch, "tokens": args.tokens,
                     "attention": args.attention, "params": n_params},
          "jaxt2i": {"train": ours["train"].as_dict(), "sample": ours["sample"].as_dict(),
                     **info},
          "pytorch": {"train": theirs["train"].as_dict(), "sample": theirs["sample"].as_dict()},
          "ratio_train": ours["train"].median_s / theirs["train"].median_s,
          "ratio_sample": ours["sample"].median_s / theirs["sample"].median_s,
          "ratio_train_of_minima": ours["train"].min_s / theirs["train"].min_s,
          "ratio_sample_of_minima": ours["sample"].min_s / theirs["sample"].min_s,
          "matmul_ceiling": ceiling,
          "mfu_train": info["train_flops"] / ours["train"].median_s / ceiling["flops_per_s"],
          "mfu_sample": info["sample_flops"] / ours["sample"].median_s / ceiling["flops_per_s"],
          "load_average_before_after": [load_before, load_after]}
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/unet.py" + "".join(
        f" --{k} {v}" for k, v in (("tokens", args.tokens), ("attention", args.attention))
        if v != parser.get_default(k))
    harness.record("unet_step", command, md, data)


if __name__ == "__main__":
  main()
