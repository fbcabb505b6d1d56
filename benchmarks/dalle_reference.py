"""Records the DALL-E reference recipe's results in RESULTS.md.

  python benchmarks/dalle_reference.py --dvae RUN_DVAE [--clip RUN_CLIP] [--dalle RUN_DALLE]

Expects runs trained with configs/dvae_shapes.py:reference, configs/clip_shapes.py:reference
and configs/dalle_shapes.py:reference (README, "DALL-E"); the later stages are optional, so
the first stage's numbers can be recorded while the transformer still trains. Measures:
  - the dVAE's hard-token reconstructions of shapes-v1 `test` images: PSNR, the codes' usage
    (perplexity, dead codes) and the shapes-v1 score of the reconstructions (the ceiling the
    tokens leave the transformer);
  - CLIP's in-batch retrieval on a `test` batch (its run's last eval);
  - the transformer's shapes-v1 score on `test` and `test_heldout` prompts (`jaxt2i eval`),
    as sampled and with CLIP reranking (the best of --num_candidates by CLIP score);
  - each run's training time (steps / median logged steps/s, from metrics.jsonl);
and copies the reranked (else plain) `test` sample grid to
benchmarks/results/dalle_reference_grid_test.png.
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
import numpy as np  # noqa: E402

import harness  # noqa: E402
from jaxt2i.eval import runner  # noqa: E402
from jaxt2i.tasks.dvae import codebook_usage  # noqa: E402

GOALS = {"test": 0.85, "test_heldout": 0.50}  # fully correct, with reranking (issue goals)


def dvae_quality(workdir: Path, num_images: int) -> dict:
  """Hard-token reconstructions of the first `num_images` test images, and code usage."""
  _, task, params = runner.load_run(workdir)
  encode = jax.jit(task.encode_tokens)
  decode = jax.jit(task.decode_tokens)
  tokens = []

  def reconstruct(x):
    t = encode(params, x)
    tokens.append(np.asarray(t))
    return decode(params, t)

  out = harness.reconstruction_quality(task.config, reconstruct, num_images)
  usage = codebook_usage(np.concatenate(tokens), task.config.model.vocab_size)
  return {**out, **{k: float(v) for k, v in usage.items()},
          "vocab_size": int(task.config.model.vocab_size)}


def last_eval(workdir: Path) -> dict:
  """The run's last eval line from metrics.jsonl (without the prefix)."""
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [l for l in lines if any(k.startswith("eval/") for k in l)]
  if not evals:
    raise ValueError(f"{workdir}/metrics.jsonl has no eval lines")
  return {"step": evals[-1]["step"], **{k[5:]: v for k, v in evals[-1].items()
                                        if k.startswith("eval/")}}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dvae", required=True)
  parser.add_argument("--clip", default=None)
  parser.add_argument("--dalle", default=None)
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--samples_per_prompt", type=int, default=2)
  parser.add_argument("--num_candidates", type=int, default=8,
                      help="images drawn per kept image when reranking with CLIP")
  parser.add_argument("--num_images", type=int, default=1000, help="for the dVAE's PSNR")
  args = parser.parse_args()
  dvae_dir = Path(args.dvae)
  clip_dir = Path(args.clip) if args.clip else None
  dalle_dir = Path(args.dalle) if args.dalle else None

  dvae = {**dvae_quality(dvae_dir, args.num_images), **harness.training_time(dvae_dir)}
  data = {"dvae": dvae, "load_average": os.getloadavg()[0]}
  dvae_config = json.loads((dvae_dir / "config.json").read_text())
  size = dvae_config["data"]["image_size"]
  stages = [f"| dVAE ({dvae['vocab_size']} codes) | {dvae['steps']} | "
            f"{dvae['steps_per_s']:.2f} | {dvae['minutes']:.0f} min |"]
  md = [f"Recipe: `configs/dvae_shapes.py:reference`, `configs/clip_shapes.py:reference`, then "
        f"`configs/dalle_shapes.py:reference` (README, \"DALL-E\"), shapes_v1/{size}, "
        "float32, one process on this CPU.", ""]
  body = [f"dVAE, hard (argmax) tokens of {dvae['num_images']} `test` images: reconstruction "
          f"PSNR **{dvae['psnr']:.2f} dB**; code perplexity {dvae['perplexity']:.1f} of "
          f"{dvae['vocab_size']}, {100 * dvae['dead_codes']:.1f}% of codes unused; the "
          f"reconstructions score {dvae['reconstructions_fully_correct']:.3f} fully correct "
          "(the ceiling the tokens leave the transformer; colour / shape "
          f"{dvae['reconstructions_per_attribute']['color']:.3f} / "
          f"{dvae['reconstructions_per_attribute']['shape']:.3f})."]

  if clip_dir is not None:
    clip = {**last_eval(clip_dir), **harness.training_time(clip_dir)}
    data["clip"] = clip
    stages.append(f"| CLIP | {clip['steps']} | {clip['steps_per_s']:.2f} | "
                  f"{clip['minutes']:.0f} min |")
    body.append(f"CLIP at step {clip['step']}, one `test` batch: image -> text top-1 "
                f"{clip['image_to_text_acc']:.3f}, text -> image "
                f"{clip['text_to_image_acc']:.3f} (in-batch; identical captions count as "
                "right).")

  if dalle_dir is not None:
    dalle_time = harness.training_time(dalle_dir)
    data["dalle_time"] = dalle_time
    model = json.loads((dalle_dir / "config.json").read_text())["model"]
    stages.append(f"| transformer ({model['depth']} x {model['width']}, sparse attention) | "
                  f"{dalle_time['steps']} | {dalle_time['steps_per_s']:.2f} | "
                  f"{dalle_time['minutes']:.0f} min |")
    # Reranked by --clip when given (CLIP may be trained after the transformer), else by the
    # CLIP the run was trained with, if any.
    settings = [("sampled", {}, None)]
    if clip_dir is not None or model.get("clip_workdir") or model.get("clip"):
      settings.append(("reranked", {"num_candidates": args.num_candidates},
                       str(clip_dir) if clip_dir is not None else None))
    evals = {}
    for name, sampling, reranker in settings:
      evals[name] = runner.evaluate_workdir(dalle_dir, num_prompts=args.num_prompts,
                                            samples_per_prompt=args.samples_per_prompt,
                                            out_dir=dalle_dir / f"eval_{name}",
                                            sampling=sampling, clip_workdir=reranker)
    data["evals"] = {k: {"sampling": v["sampling"], "splits": v["splits"]}
                     for k, v in evals.items()}
    best = "reranked" if "reranked" in evals else "sampled"
    grid_path = harness.RESULTS_DIR / "dalle_reference_grid_test.png"
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    shutil.copy(dalle_dir / f"eval_{best}" / "grid_test.png", grid_path)
    rows = []
    for name, res in evals.items():
      for split in ("test", "test_heldout"):
        r = res["splits"][split]
        per = harness.attribute_cells(r)
        how = (f"best of {args.num_candidates} by CLIP" if name == "reranked" else "one draw")
        rows.append(f"| {split} | {how} | {r['num_images']} | **{r['fully_correct']:.3f}** | "
                    f"{per} | {r['frechet_distance']:.3g} |")
    verdicts = []
    for split, goal in GOALS.items():
      got = evals[best]["splits"][split]["fully_correct"]
      verdicts.append(f">= {goal:.2f} on {split} (got {got:.3f}: "
                      f"{'met' if got >= goal else 'not met'})")
    body.append(
        f"Transformer samples (temperature {model['temperature']:g}, top-k {model['top_k']}, "
        f"guidance {model['guidance_scale']:g}, EMA weights), {args.num_prompts} prompts x "
        f"{args.samples_per_prompt} per split:\n\n"
        "| split | sampling | images | fully correct | colour / shape / size / place / count | "
        "Frechet dist. (evaluator features) |\n|---|---|---|---|---|---|\n" + "\n".join(rows) +
        f"\n\nGoals ({best}): " + ", ".join(verdicts) + f". Sample grid ({best}, `test`, one "
        f"row per prompt): [results/{grid_path.name}](results/{grid_path.name}).")

  md += ["| stage | steps | steps/s | training time |", "|---|---|---|---|", *stages, ""]
  md += [b + "\n" for b in body]
  command = f"python benchmarks/dalle_reference.py --dvae {dvae_dir}"
  command += f" --clip {clip_dir}" if clip_dir else ""
  command += f" --dalle {dalle_dir}" if dalle_dir else ""
  harness.record("dalle_reference", command, "\n".join(md), data)


if __name__ == "__main__":
  main()
