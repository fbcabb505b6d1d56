"""Records the latent-diffusion reference recipe's results in RESULTS.md.

  python benchmarks/ldm_reference.py --autoencoder RUN_AE --ldm RUN_LDM [--num_prompts 50]

Expects the two runs trained with configs/autoencoder_shapes.py:reference and
configs/ldm_shapes.py:reference (README, "Latent diffusion"). Measures:
  - the autoencoder's reconstruction PSNR on shapes-v1 `test` images (posterior mean), and the
    shapes-v1 score of those reconstructions (what the first stage lets a perfect LDM reach);
  - the LDM's shapes-v1 score on `test` and `test_heldout` prompts (`jaxt2i eval`), with the
    recipe's guidance (and with --unguided also without: scale 1);
  - each run's training time (first to last logged step, from metrics.jsonl) and steps/s;
and copies the guided `test` sample grid to benchmarks/results/ldm_reference_grid_test.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402

import harness  # noqa: E402
from jaxt2i.eval import runner  # noqa: E402


def autoencoder_quality(workdir: Path, num_images: int) -> dict:
  """Reconstruction PSNR (posterior mean) on the first `num_images` shapes-v1 test images, and
  the shapes-v1 score of the reconstructions."""
  _, task, params = runner.load_run(workdir, ema=False)
  recon_fn = jax.jit(lambda p, x: task.reconstruct(p, x)[0])
  return harness.reconstruction_quality(task.config, lambda x: recon_fn(params, x), num_images)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--autoencoder", required=True)
  parser.add_argument("--ldm", required=True)
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--unguided", action="store_true",
                      help="also score samples without guidance (scale 1)")
  parser.add_argument("--samples_per_prompt", type=int, default=2)
  parser.add_argument("--num_images", type=int, default=1000, help="for the AE PSNR")
  args = parser.parse_args()
  ae_dir, ldm_dir = Path(args.autoencoder), Path(args.ldm)

  ae = {**autoencoder_quality(ae_dir, args.num_images), **harness.training_time(ae_dir)}
  ldm_time = harness.training_time(ldm_dir)
  evals = {}
  settings = [("guided", {})] + ([("unguided", {"guidance_scale": 1.0})] if args.unguided else [])
  for name, sampling in settings:
    out = ldm_dir / f"eval_{name}"
    evals[name] = runner.evaluate_workdir(ldm_dir, num_prompts=args.num_prompts,
                                          samples_per_prompt=args.samples_per_prompt,
                                          out_dir=out, sampling=sampling)
  grid = harness.RESULTS_DIR / "ldm_reference_grid_test.png"
  harness.RESULTS_DIR.mkdir(exist_ok=True)
  shutil.copy(ldm_dir / "eval_guided" / "grid_test.png", grid)

  config = json.loads((ldm_dir / "config.json").read_text())
  model = config["model"]
  ae_config = json.loads((ae_dir / "config.json").read_text())
  ae_model = ae_config["model"]
  factor = 2 ** (len(ae_model["block_out_channels"]) - 1)
  latent = ae_config["data"]["image_size"] // factor
  rows = []
  for name, res in evals.items():
    s = res["sampling"]
    for split in ("test", "test_heldout"):
      r = res["splits"][split]
      per = harness.attribute_cells(r)
      rows.append(f"| {split} | {s['guidance_scale']:g} | {r['num_images']} | "
                  f"**{r['fully_correct']:.3f}** | {per} | {r['frechet_distance']:.3g} |")
  goal_test = evals["guided"]["splits"]["test"]["fully_correct"]
  goal_held = evals["guided"]["splits"]["test_heldout"]["fully_correct"]
  md = (
      "Recipe: `configs/autoencoder_shapes.py:reference` then `configs/ldm_shapes.py:reference` "
      "(README, \"Latent diffusion\"), shapes_v1/64, batch 32, float32, one process on this "
      "CPU.\n\n"
      "| stage | steps | steps/s | training time |\n|---|---|---|---|\n"
      f"| autoencoder ({ae_model['kind'].upper()}, f={factor}, {latent}x{latent}x"
      f"{ae_model['latent_channels']} latents) | {ae['steps']} | {ae['steps_per_s']:.2f} | "
      f"{ae['minutes']:.0f} min |\n"
      f"| LDM (U-Net {tuple(model['block_out_channels'])}, text encoder "
      f"{model['text_width']}x{model['text_depth']}) | {ldm_time['steps']} | "
      f"{ldm_time['steps_per_s']:.2f} | {ldm_time['minutes']:.0f} min |\n\n"
      f"Autoencoder on {ae['num_images']} `test` images: reconstruction PSNR "
      f"**{ae['psnr']:.2f} dB**; the reconstructions score {ae['reconstructions_fully_correct']:.3f} "
      "fully correct (the ceiling the first stage leaves the LDM; colour / shape "
      f"{ae['reconstructions_per_attribute']['color']:.3f} / "
      f"{ae['reconstructions_per_attribute']['shape']:.3f}).\n\n"
      f"LDM samples ({model['sampler']}, {model['num_sampling_steps']} steps, EMA weights), "
      f"{args.num_prompts} prompts x {args.samples_per_prompt} per split:\n\n"
      "| split | guidance | images | fully correct | colour / shape / size / place / count | "
      "Frechet dist. (evaluator features) |\n|---|---|---|---|---|---|\n" + "\n".join(rows) +
      f"\n\nGoals with guidance: >= 0.90 on test (got {goal_test:.3f}: "
      f"{'met' if goal_test >= 0.9 else 'not met'}), >= 0.60 on test_heldout (got "
      f"{goal_held:.3f}: {'met' if goal_held >= 0.6 else 'not met'}). Sample grid (guided, "
      f"`test`, one row per prompt): [results/{grid.name}](results/{grid.name}).\n")
  data = {"autoencoder": ae, "ldm_time": ldm_time,
          "evals": {k: {"sampling": v["sampling"], "splits": v["splits"]} for k, v in
                    evals.items()}, "load_average": os.getloadavg()[0]}
  command = f"python benchmarks/ldm_reference.py --autoencoder {ae_dir} --ldm {ldm_dir}"
  command += " --unguided" if args.unguided else ""
  harness.record("ldm_reference", command, md, data)


if __name__ == "__main__":
  main()
