"""U-Net step times: jaxt2i's Flax UNet against diffusers' PyTorch UNet2DConditionModel.

  python benchmarks/unet.py [--preset cpu|sd15] [--dtype float32|bfloat16] [--repeats 5]
      [--batch 8] [--tokens 77] [--attention auto] [--sampling_steps 0] [--torch_compile]
      [--skip_train] [--no_record]

Presets:
  cpu   a latent-diffusion U-Net of SD1 shape at CPU size: block_out_channels (64, 128, 256),
        layers_per_block 2, cross-attention in the two upper resolutions (8 heads, SD1's
        `attention_head_dim`), cross_attention_dim 256, 4-channel 32x32 latents, batch 8.
  sd15  the Stable Diffusion 1.5 U-Net (diffusers' default layout, cross_attention_dim 768,
        860M parameters), 4-channel 64x64 latents (512 px images): for accelerators.

Both frameworks get the same weights (diffusers' random init, converted) and the same inputs,
77 text tokens (CLIP's length), on this machine's first device (torch on CUDA when JAX runs
on a GPU; else on the CPU with as many threads as cores). With --dtype bfloat16 both keep
float32 parameters and Adam state and compute in bfloat16 (torch under autocast, as diffusers'
training scripts do with mixed_precision="bf16"); the sampling passes use bfloat16 weights.

  train step     forward + MSE to the noise + backward + Adam (lr 1e-4) update; ours is one
                 jitted function with params and optimizer state donated.
  sampling step  forward only (torch.inference_mode; jitted apply). With --skip_train (the
                 sd15 preset on a CPU: its Adam state does not fit beside two models) only
                 this step and the loops are timed; `--batch 2` is one guided step of a
                 512 px pipeline at one image.
  sampling loop  (--sampling_steps N) N DDIM steps with classifier-free guidance (the cond
                 and uncond halves in one batched call, as StableDiffusionPipeline does) at
                 batch 1 and `--batch`: ours one jitted fori_loop (jaxt2i.diffusion.samplers),
                 theirs diffusers' DDIMScheduler loop, eager and (--torch_compile) with the
                 U-Net under torch.compile. The VAE decode and text encoder are not included.

Reported: medians (and minima) of `--repeats` timings after 2 warm-up calls, the two
frameworks alternating step by step so that load from other processes on a shared machine
hits both alike; the ratio ours / PyTorch of the medians (and of the minima, steadier when
the machine is busy); compile times, XLA's cost_analysis FLOPs and the model FLOP utilisation
against the matmul ceiling measured in the same run. Recorded as `unet_step` (on a GPU,
`unet_step_gpu`) in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
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

PRESETS = {
    "cpu": {
        "block_out_channels": (64, 128, 256), "layers_per_block": 2, "cross_attention_dim": 256,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 32,
    },
    # diffusers' defaults are the SD 1.x layout (320-640-1280-1280, 8 heads); SD 1.5 conditions
    # on CLIP ViT-L/14's 768-wide token states.
    "sd15": {"cross_attention_dim": 768, "sample_size": 64},
}
LEARNING_RATE = 1e-4
GUIDANCE_SCALE = 7.5


def make_inputs(config: dict, batch: int, tokens: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  size = config["sample_size"]
  return {"sample": rng.standard_normal((batch, size, size, 4), np.float32),
          "timesteps": rng.integers(0, 1000, batch).astype(np.int32),
          "text": rng.standard_normal((batch, tokens, config["cross_attention_dim"]),
                                      np.float32),
          "noise": rng.standard_normal((batch, size, size, 4), np.float32)}


def jax_steps(model, params, inputs, dtype, train: bool = True) -> tuple[dict, dict]:
  """The jitted train and sampling steps as blocking no-argument callables, and their
  compile times and FLOPs."""
  sample, timesteps, text, noise = (jnp.asarray(inputs[k])
                                    for k in ("sample", "timesteps", "text", "noise"))
  optimizer = optax.adam(LEARNING_RATE)

  def train_step(params, opt_state, sample, timesteps, text, noise):
    def loss_fn(p):
      out = model.apply({"params": p}, sample, timesteps, text).astype(jnp.float32)
      return jnp.mean((out - noise) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = {"params": jax.tree.map(jnp.asarray, params)}
  train_flops = train_compile_s = None
  if train:
    state["opt"] = optimizer.init(state["params"])
    train_args = (state["params"], state["opt"], sample, timesteps, text, noise)
    train_flops = harness.xla_flops(jax.jit(train_step), *train_args)
    train, train_compile_s = harness.compile_seconds(
        jax.jit(train_step, donate_argnums=(0, 1)), *train_args)
  # Copies: the train step donates (deletes) its params.
  cast = lambda p: jax.tree.map(lambda x: jnp.array(x, dtype, copy=True), p)
  forward_args = ({"params": cast(state["params"])}, sample, timesteps, text)
  sample_flops = harness.xla_flops(jax.jit(model.apply), *forward_args)
  forward, sample_compile_s = harness.compile_seconds(jax.jit(model.apply), *forward_args)

  def train_once():
    state["params"], state["opt"], loss = train(state["params"], state["opt"], sample,
                                                timesteps, text, noise)
    jax.block_until_ready(loss)

  sampling_params = {"params": cast(state["params"])}
  if not train:
    del state["params"]

  def sample_once():
    jax.block_until_ready(forward(sampling_params, sample, timesteps, text))

  info = {"train_compile_s": train_compile_s, "sample_compile_s": sample_compile_s,
          "train_flops": train_flops, "sample_flops": sample_flops}
  return {"train": train_once, "sample": sample_once, "sampling_params": sampling_params}, info


def torch_device():
  import torch
  return "cuda" if harness.on_accelerator() and torch.cuda.is_available() else "cpu"


def torch_steps(reference, inputs, dtype: str, train: bool = True) -> dict:
  """diffusers' train and sampling steps on the same inputs (NCHW)."""
  import torch
  device = torch_device()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  sample, noise = to_nchw(inputs["sample"]), to_nchw(inputs["noise"])
  timesteps = torch.from_numpy(inputs["timesteps"].astype(np.int64)).to(device)
  text = torch.from_numpy(inputs["text"]).to(device)
  optimizer = torch.optim.Adam(reference.parameters(), lr=LEARNING_RATE) if train else None
  reference.train()  # dropout is 0: the same function as eval mode
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  low = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  sampler = copy.deepcopy(reference).to(low).eval() if train or low != torch.float32 else \
      reference.eval()

  def train_once():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      out = reference(sample, timesteps, text).sample
    torch.nn.functional.mse_loss(out.float(), noise).backward()
    optimizer.step()
    sync()

  def sample_once():
    with torch.inference_mode():
      sampler(sample.to(low), timesteps, text.to(low))
    sync()

  return {"train": train_once, "sample": sample_once, "sampler": sampler}


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


def jax_sampling_loop(model, params, config, batch, tokens, steps, dtype):
  """N guided DDIM steps in one jitted loop; returns (blocking callable, compile seconds)."""
  from jaxt2i.diffusion import samplers, schedules
  schedule = schedules.make_schedule("scaled_linear")
  rng = np.random.default_rng(1)
  size = config["sample_size"]
  x_T = jnp.asarray(rng.standard_normal((batch, size, size, 4), np.float32))
  context = jnp.asarray(rng.standard_normal((2 * batch, tokens, config["cross_attention_dim"]),
                                            np.float32)).astype(dtype)

  def run(params, x_T, context, scale, num_steps):
    def batched(x, t):
      return model.apply(params, x.astype(dtype), t, context).astype(jnp.float32)
    return samplers.sample(samplers.guided(batched, scale), schedule, x_T, sampler="ddim",
                           num_steps=num_steps, steps_offset=1, set_alpha_to_one=False)

  compiled, seconds = harness.compile_seconds(jax.jit(run), params, x_T, context,
                                              jnp.float32(GUIDANCE_SCALE), jnp.int32(steps))
  return (lambda: jax.block_until_ready(compiled(params, x_T, context,
                                                 jnp.float32(GUIDANCE_SCALE),
                                                 jnp.int32(steps))), seconds)


def torch_sampling_loop(unet, config, batch, tokens, steps, dtype):
  """The same loop as diffusers' StableDiffusionPipeline runs it, minus text encoder / VAE."""
  import diffusers
  import torch
  device = torch_device()
  low = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                      beta_end=0.012, steps_offset=1, set_alpha_to_one=False,
                                      clip_sample=False)
  size = config["sample_size"]
  generator = torch.Generator().manual_seed(1)
  x_T = torch.randn((batch, 4, size, size), generator=generator).to(device)
  context = torch.randn((2 * batch, tokens, config["cross_attention_dim"]),
                        generator=generator).to(device, low)

  def run():
    scheduler.set_timesteps(steps, device=device)
    x = x_T
    with torch.inference_mode():
      for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]).to(low), t, context).sample.float()
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + GUIDANCE_SCALE * (cond - uncond), t, x).prev_sample
    if device == "cuda":
      torch.cuda.synchronize()
    return x
  return run


def sampling_loops(args, config, model, jax_params, theirs_fns, dtype) -> tuple[list, dict]:
  """Times the guided DDIM loops of both frameworks at batch 1 and args.batch."""
  import torch
  rows, data = [], {}
  compiled_unet = None
  for batch in sorted({1, args.batch}):
    ours, compile_s = jax_sampling_loop(model, jax_params, config, batch, args.tokens,
                                        args.sampling_steps, dtype)
    fns = {"ours": ours,
           "torch": torch_sampling_loop(theirs_fns["sampler"], config, batch, args.tokens,
                                        args.sampling_steps, args.dtype)}
    torch_compile_s = None
    if args.torch_compile:
      if compiled_unet is None:
        compiled_unet = torch.compile(theirs_fns["sampler"])
      fns["torch.compile"] = torch_sampling_loop(compiled_unet, config, batch, args.tokens,
                                                 args.sampling_steps, args.dtype)
      start = time.perf_counter()
      fns["torch.compile"]()  # compiles (once per batch size)
      torch_compile_s = time.perf_counter() - start
    timing = time_interleaved(fns, warmup=1, repeats=args.loop_repeats)
    data[str(batch)] = {name: t.as_dict() for name, t in timing.items()}
    data[str(batch)].update(jax_compile_s=compile_s, torch_compile_s=torch_compile_s)
    cells = " | ".join(f"{timing[n].median_s:.3f} ({batch / timing[n].median_s:.2f})"
                       for n in ("ours", "torch", "torch.compile") if n in timing)
    best = min((timing[n].median_s for n in timing if n != "ours"))
    rows.append(f"| {batch} | {cells} | **{best / timing['ours'].median_s:.2f}x** |")
    print(rows[-1], flush=True)
  return rows, data


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=77)
  parser.add_argument("--attention", default="auto", help="UNet.attention_implementation")
  parser.add_argument("--sampling_steps", type=int, default=0,
                      help="also time N-step guided DDIM loops (0: skip)")
  parser.add_argument("--loop_repeats", type=int, default=3)
  parser.add_argument("--torch_compile", action="store_true",
                      help="also time the loops with the PyTorch U-Net under torch.compile")
  parser.add_argument("--skip_train", action="store_true",
                      help="time sampling only (the forward step and the loops)")
  parser.add_argument("--no_record", action="store_true", help="print only")
  args = parser.parse_args()
  config = PRESETS[args.preset]
  steps = ("sample",) if args.skip_train else ("train", "sample")
  dtype = jnp.dtype(args.dtype)

  import diffusers
  import torch
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  reference = diffusers.UNet2DConditionModel(**config)
  config = {**reference.config, **config}
  with tempfile.TemporaryDirectory() as tmp:
    reference.save_pretrained(tmp)
    model, params = diffusers_unet.load_diffusers_unet(
        tmp, attention_implementation=args.attention, dtype=dtype)
  reference.to(torch_device())
  inputs = make_inputs(config, args.batch, args.tokens)
  n_params = sum(p.numel() for p in reference.parameters())
  print(f"{args.preset}: {n_params / 1e6:.1f}M parameters, {jax.devices()[0].device_kind}, "
        f"torch on {torch_device()}", flush=True)

  load_before = os.getloadavg()[0]
  ceiling = harness.matmul_ceiling()
  ours_fns, info = jax_steps(model, params, inputs, dtype, train=not args.skip_train)
  del params
  theirs_fns = torch_steps(reference, inputs, args.dtype, train=not args.skip_train)
  ours, theirs = {}, {}
  for step in steps:
    timing = time_interleaved({"ours": ours_fns[step], "theirs": theirs_fns[step]},
                              warmup=2, repeats=args.repeats)
    ours[step], theirs[step] = timing["ours"], timing["theirs"]
    print(f"{step}: ours {ours[step].median_s:.4f} s, PyTorch {theirs[step].median_s:.4f} s",
          flush=True)
  if "train" in ours:
    print(f"train compile {info['train_compile_s']:.1f} s, {info['train_flops'] / 1e12:.3g} "
          f"TFLOP: MFU {info['train_flops'] / ours['train'].median_s / ceiling['flops_per_s']:.1%}",
          flush=True)
  print(f"sampling compile {info['sample_compile_s']:.1f} s, {info['sample_flops'] / 1e12:.3g} "
        f"TFLOP: {info['sample_flops'] / ours['sample'].median_s / ceiling['flops_per_s']:.1%}; "
        f"ceiling {ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s", flush=True)
  loop_rows, loop_data = [], None
  if args.sampling_steps:
    del reference
    theirs_fns.pop("train", None)
    loop_rows, loop_data = sampling_loops(args, config, model, ours_fns["sampling_params"],
                                          theirs_fns, dtype)
  load_after = os.getloadavg()[0]

  rows = []
  for step, label in (("train", "train (fwd + bwd + Adam)"), ("sample", "sampling (forward)")):
    if step not in ours:
      continue
    a, b = ours[step], theirs[step]
    rows.append(f"| {label} | {a.median_s:.4f} ({a.min_s:.4f}) | {b.median_s:.4f} "
                f"({b.min_s:.4f}) | **{a.median_s / b.median_s:.2f}x** "
                f"({a.min_s / b.min_s:.2f}x) |")
  rate = lambda flops, t: flops / t.median_s
  device = jax.devices()[0]
  threads = (f"with {torch.get_num_threads()} threads" if torch_device() == "cpu"
             else f"on {torch.cuda.get_device_name()}")
  md = (f"Preset `{args.preset}`: block_out_channels {tuple(config['block_out_channels'])}, "
        f"layers_per_block {config['layers_per_block']}, attention_head_dim "
        f"{config['attention_head_dim']}, cross_attention_dim {config['cross_attention_dim']}, "
        f"{n_params / 1e6:.1f}M params; batch {args.batch} of 4x{config['sample_size']}x"
        f"{config['sample_size']} latents, {args.tokens} text tokens; {args.dtype} compute "
        f"(float32 params and Adam state in training); attention `{args.attention}`; jax "
        f"{jax.__version__} on {device.platform} ({device.device_kind}), torch "
        f"{torch.__version__} {threads}, diffusers {diffusers.__version__}. Medians (minima) "
        f"of {args.repeats} repeats after 2 warm-up calls, the two frameworks alternating.\n\n"
        "| step | jaxt2i s/step | PyTorch s/step | ours / PyTorch (of minima) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n")
  if "train" in ours:
    md += (f"Train step: compile {info['train_compile_s']:.1f} s, XLA cost_analysis "
           f"{info['train_flops'] / 1e9:.1f} GFLOP "
           f"({rate(info['train_flops'], ours['train']) / 1e9:.0f} GFLOP/s at the median); ")
  md += (f"sampling step {info['sample_flops'] / 1e9:.1f} GFLOP, compile "
         f"{info['sample_compile_s']:.1f} s. Goal: ours <= 1.0x PyTorch.\n\n"
         f"Model FLOP utilisation: the measured XLA {ceiling['dtype']} matmul ceiling is "
         f"{ceiling['flops_per_s'] / 1e12:.3g} TFLOP/s (best of square matmuls "
         f"{', '.join(f'{n}: {r / 1e12:.3g}' for n, r in ceiling['by_size'].items())}); ")
  if "train" in ours:
    md += (f"the train step runs at "
           f"**{rate(info['train_flops'], ours['train']) / ceiling['flops_per_s']:.0%} of it** "
           "(sampling step ")
  else:
    md += "the sampling step runs at "
  md += (f"{rate(info['sample_flops'], ours['sample']) / ceiling['flops_per_s']:.0%}"
         + (").\n" if "train" in ours else " of it.\n"))
  if loop_rows:
    names = ["ours", "torch eager"] + (["torch.compile"] if args.torch_compile else [])
    md += (f"\nSampling loop: {args.sampling_steps} DDIM steps with classifier-free guidance "
           f"(scale {GUIDANCE_SCALE}, cond + uncond in one batched call), U-Net only (no text "
           f"encoder, no VAE decode); seconds per batch (images/s); medians of "
           f"{args.loop_repeats}.\n\n| batch | " + " | ".join(names) +
           " | best PyTorch / ours |\n|---|" + "---|" * (len(names) + 1) + "\n"
           + "\n".join(loop_rows) + "\n\nCompile: " + "; ".join(
               f"batch {b}: jaxt2i {d['jax_compile_s']:.1f} s"
               + (f", torch.compile {d['torch_compile_s']:.1f} s (first call)"
                  if d["torch_compile_s"] is not None else "")
               for b, d in loop_data.items()) + ".\n")
  md += (f"\n1-minute load average before / after: {load_before:.2f} / {load_after:.2f} (this "
         "run's own threads included).")
  if not harness.on_accelerator():
    md += (" Other processes on the 2 cores slow both frameworks, PyTorch's OpenMP threads "
           "far more than XLA's work-stealing pool, so a loaded run flatters the ratio; trust "
           "runs with load near 2.")
  md += "\n"
  data = {"config": {**{k: v for k, v in config.items() if not k.startswith("_")},
                     "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
                     "tokens": args.tokens, "attention": args.attention, "params": n_params},
          "jaxt2i": {**{k: t.as_dict() for k, t in ours.items()}, **info},
          "pytorch": {k: t.as_dict() for k, t in theirs.items()},
          **{f"ratio_{k}": ours[k].median_s / theirs[k].median_s for k in ours},
          **{f"ratio_{k}_of_minima": ours[k].min_s / theirs[k].min_s for k in ours},
          "matmul_ceiling": ceiling,
          "mfu_train": (rate(info["train_flops"], ours["train"]) / ceiling["flops_per_s"]
                        if "train" in ours else None),
          "mfu_sample": rate(info["sample_flops"], ours["sample"]) / ceiling["flops_per_s"],
          "sampling_loops": loop_data,
          "load_average_before_after": [load_before, load_after]}
  if args.no_record:
    print(md)
  else:
    command = "python benchmarks/unet.py" + "".join(
        f" --{k} {v}" for k, v in vars(args).items()
        if k not in ("no_record", "torch_compile", "skip_train")
        and v != parser.get_default(k)) + (
        " --torch_compile" if args.torch_compile else "") + (
        " --skip_train" if args.skip_train else "")
    # (On an accelerator the sd15 preset is the one run: harness names it unet_step_gpu.)
    name = "unet_step" + (f"_{args.preset}" if args.preset != "cpu"
                          and not harness.on_accelerator() else "")
    harness.record(name, command, md, data)


if __name__ == "__main__":
  main()
