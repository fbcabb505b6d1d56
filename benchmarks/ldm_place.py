"""Where a latent-diffusion run puts a one-object caption's object, and why. Records in RESULTS.md.

  python benchmarks/ldm_place.py --ldm RUN[:STEP] [--ldm RUN[:STEP] ...] [--guidance 5]
      [--keep_earlier]   # also keep the earlier record's other rows (rotated checkpoints)

For each run (EMA weights; a kept checkpoint's step after a colon):
  - Place accuracy: 10 one-object captions per grid cell (90, the same for every run), one
    sample each (the run's sampler, 25 steps, guidance --guidance), scored by the shapes-v1
    evaluator: every attribute, place the one at issue.
  - The leak test: 27 rendered one-object scenes (3 per cell), noised to timestep t, and the
    model's x_0 prediction at t (conditional branch, no guidance) given the true caption and
    given the caption naming the opposite cell ((row, col) -> (2 - row, 2 - col)). The
    predicted object's centre (brightness centroid of the decoded prediction) is in the
    caption's cell for a model that places from the caption, and in the image's cell for one
    that reads the place off what x_t still shows of the object. At a schedule's noisiest
    timesteps the second kind never learns to place from text: sampling starts from pure noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from jaxt2i.data import pipeline as data_pipeline  # noqa: E402
from jaxt2i.data import shapes  # noqa: E402
from jaxt2i.diffusion import schedules  # noqa: E402
from jaxt2i.eval import shapes as shapes_eval  # noqa: E402

TIMESTEPS = (999, 900, 700)


def place_captions(per_cell: int = 10) -> list[str]:
  """One-object captions, `per_cell` per grid cell, attributes drawn from a fixed seed."""
  rng = np.random.default_rng(0)
  colors = list(shapes.COLORS)
  captions = []
  for cell in range(9):
    for _ in range(per_cell):
      color = colors[rng.integers(len(colors))]
      shape = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
      size = ("small", "large")[rng.integers(2)]
      captions.append(f"a {size} {color} {shape} {shapes.position_phrase(*divmod(cell, 3))}")
  return captions


def place_accuracy(pipe, guidance: float) -> dict:
  captions = place_captions()
  images = np.concatenate([pipe(captions[i:i + 30], seed=i, steps=25, guidance_scale=guidance,
                                output="np") for i in range(0, len(captions), 30)])
  report = shapes_eval.score(images, captions)
  return {"fully_correct": report["fully_correct"], **report["per_attribute"]}


def centroid(image: np.ndarray) -> tuple[float, float]:
  """(x, y) in units of the width of the pixels brighter than the background; NaN if none."""
  bright = image.astype(np.float32).max(-1) > 60
  if bright.sum() < 5:
    return np.nan, np.nan
  ys, xs = np.nonzero(bright)
  return xs.mean() / image.shape[1], ys.mean() / image.shape[0]


def leak_test(config, task, params, tokenizer) -> list[dict]:
  objects = []
  for cell in range(9):
    row, col = divmod(cell, 3)
    for color, shape in (("red", "circle"), ("blue", "square"), ("yellow", "triangle")):
      objects.append(shapes.ShapeObject(color=color, shape=shape, size="large", row=row,
                                        col=col, x=(2 * col + 1) / 6, y=(2 * row + 1) / 6))
  scenes = [shapes.Scene((o,), shapes.position_phrase(o.row, o.col)) for o in objects]
  opposite = [shapes.Scene((o,), shapes.position_phrase(2 - o.row, 2 - o.col)) for o in objects]
  low, high = config.data.value_range
  images = np.stack([shapes.render(s, config.data.image_size) for s in scenes])
  images = images.astype(np.float32) / 255.0 * (high - low) + low
  x0 = task.encode_images(params, jnp.asarray(images), None)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  cells = np.array([[(2 * o.col + 1) / 6, (2 * o.row + 1) / 6] for o in objects])
  schedule = task.schedule

  @jax.jit
  def predicted_images(x_t, t, tokens, mask):
    t = jnp.full((x_t.shape[0],), t)
    context = task.encode_text(params, tokens, mask)
    out = task.unet.apply({"params": params["unet"]}, x_t, t, context)
    return task.decode_latents(params, schedules.to_x0_eps(schedule, out, x_t, t)[0])

  def in_cell(found, target):
    return float(np.mean(np.all(np.abs(found - target) < 1 / 6, axis=1)))

  rows = []
  for t in TIMESTEPS:
    x_t = schedules.add_noise(schedule, x0, noise, jnp.full((x0.shape[0],), t))
    row = {"t": t, "snr": float(schedules.snr(schedule, jnp.array([t]))[0])}
    for name, caption_scenes, target in (("true", scenes, cells), ("opposite", opposite,
                                                                   1.0 - cells)):
      tokens, mask = tokenizer.encode([s.caption for s in caption_scenes],
                                      config.data.max_caption_length)
      found = np.array([centroid(i) for i in np.asarray(predicted_images(
          x_t, t, jnp.asarray(tokens), jnp.asarray(mask)))])
      row[f"{name}_caption_cell"] = in_cell(found, target)
      row[f"{name}_image_cell"] = in_cell(found, cells)
    rows.append(row)
  return rows


def run_label(spec: str) -> str:
  """A table label for RUN[:STEP]: the run's name, step and diffusion settings (from its
  config.json, so it needs no checkpoint)."""
  workdir, _, step = spec.partition(":")
  m = json.loads((Path(workdir) / "config.json").read_text())["model"]
  return (f"`{Path(workdir).name}` step {step or 'latest'} ({m['prediction_type']}, "
          f"{m['loss_weighting']} weighting, snr_shift {m.get('snr_shift', 1.0):g}"
          f"{', zero terminal SNR' if m.get('rescale_zero_terminal_snr') else ''})")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ldm", action="append", required=True, help="RUN or RUN:STEP")
  parser.add_argument("--guidance", type=float, default=5.0)
  parser.add_argument("--keep_earlier", action="store_true",
                      help="keep the rows of runs in results/ldm_place.json not measured now "
                           "(their checkpoints may be gone), measured first")
  args = parser.parse_args()
  import jaxt2i

  data = {}
  if args.keep_earlier:
    earlier = json.loads((harness.RESULTS_DIR / "ldm_place.json").read_text())
    data = {k: v for k, v in earlier.items() if isinstance(v, dict) and "place" in v
            and k not in args.ldm}
    other = [k for k, v in data.items() if v.get("guidance", 5.0) != args.guidance]
    if other:
      raise SystemExit(f"--keep_earlier: {other} were sampled at another guidance")
  for spec in args.ldm:
    workdir, _, step = spec.partition(":")
    step = int(step) if step else None
    pipe = jaxt2i.load(workdir, step=step)
    config, task = pipe.config, pipe.task
    params = jax.device_get(pipe.params)
    place = place_accuracy(pipe, args.guidance)
    tokenizer = data_pipeline.load_tokenizer(config.data, workdir)
    leak = leak_test(config, task, params, tokenizer)
    data[spec] = {"place": place, "leak": leak, "guidance": args.guidance}
  place_rows, leak_rows = [], []
  for spec, result in data.items():
    label, place, leak = run_label(spec), result["place"], result["leak"]
    place_rows.append(f"| {label} | **{place['place']:.3f}** | {place['color']:.3f} | "
                      f"{place['shape']:.3f} | {place['size']:.3f} | {place['count']:.3f} | "
                      f"{place['fully_correct']:.3f} |")
    for r in leak:
      leak_rows.append(f"| {label} | {r['t']} | {r['snr']:.2g} | {r['true_caption_cell']:.2f} | "
                       f"**{r['opposite_caption_cell']:.2f}** | {r['opposite_image_cell']:.2f} |")
  md = "\n".join([
      f"One-object captions, 10 per grid cell (90), one sample each, DDIM 25 steps, guidance "
      f"{args.guidance:g}; EMA weights. Chance for place is 1/9 = 0.111.", "",
      "| run | place | colour | shape | size | count | fully correct |",
      "|---|---|---|---|---|---|---|", *place_rows, "",
      "Leak test: 27 rendered one-object scenes noised to timestep t; the cell of the object in "
      "the model's x_0 prediction (conditional, no guidance) given the true caption, and given "
      "the caption naming the opposite cell. A model that places from text follows the "
      "opposite caption; one that reads the place off x_t stays in the image's cell.", "",
      "| run | t | SNR | true caption: in its cell | opposite caption: in the caption's cell | "
      "opposite caption: in the image's cell |", "|---|---|---|---|---|---|", *leak_rows])
  command = "python benchmarks/ldm_place.py " + " ".join(f"--ldm {s}" for s in args.ldm)
  if args.keep_earlier:
    command += " --keep_earlier (rows kept from the earlier record: " + ", ".join(
        s for s in data if s not in args.ldm) + ")"
  harness.record("ldm_place", command, md, data)


if __name__ == "__main__":
  main()
