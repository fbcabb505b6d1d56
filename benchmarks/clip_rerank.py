"""What CLIP reranking buys a DALL-E run, against drawing one image and against a perfect
reranker; recorded in RESULTS.md (`clip_rerank`).

  python benchmarks/clip_rerank.py --dalle RUN [--clip CLIP_RUN] [--num_prompts 32]
      [--num_candidates 16] [--seed 0] [--step STEP]

For the first --num_prompts shapes-v1 prompts of `test` and of `test_heldout` (the prompts
`jaxt2i eval` uses), draws --num_candidates images each with the run's sampling settings
(guidance, temperature, top-k / top-p), judges every candidate with the shapes-v1 evaluator
and scores it with CLIP (the cosine the pipeline ranks by: `pipe(..., num_candidates=N)`).
Two measures of a candidate: fully correct, and the fraction of its judged attributes that
are right (each named object's colour, shape and size, the place and the count; it still
moves when few images are fully correct). For n = 1, 2, 4, ... candidates (the first n of
each prompt) it reports the CLIP-best candidate's measure, against one random draw's
(expected) and the best candidate's (what a perfect reranker would keep); and CLIP's pairwise
accuracy (how often, within a prompt, the better of two candidates has the higher CLIP
score; 0.5 = a reranker that knows nothing). CLIP is the run's own (model.clip_workdir)
unless --clip names another CLIP run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

import harness  # noqa: E402
from jaxt2i.data import pipeline  # noqa: E402
from jaxt2i.eval import clip_score, runner, shapes as shapes_eval  # noqa: E402


def attribute_fraction(verdict: dict) -> float:
  """The fraction of a shapes-v1 verdict's judged attributes that are right: each named
  object's colour, shape and size, the place and the count."""
  flags = [x for name in ("color", "shape", "size") for x in verdict["objects"][name]]
  flags += [verdict["place"], verdict["count"]]
  return float(np.mean(flags))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dalle", required=True, help="a DALL-E run (configs/dalle_shapes.py)")
  parser.add_argument("--clip", default=None,
                      help="a CLIP run (configs/clip_shapes.py); default: the run's own")
  parser.add_argument("--num_prompts", type=int, default=32, help="prompts per split")
  parser.add_argument("--num_candidates", type=int, default=16, help="images per prompt")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="a kept checkpoint's step")
  args = parser.parse_args()
  if args.num_prompts < 1 or args.num_candidates < 2:
    parser.error("--num_prompts must be >= 1 and --num_candidates >= 2")
  start = time.perf_counter()
  config, task, params = runner.load_run(args.dalle, clip_workdir=args.clip, step=args.step)
  if config.task != "dalle":
    parser.error(f"--dalle {args.dalle} is a {config.task!r} run, not a DALL-E run")
  clip_dir = args.clip or config.model.clip_workdir
  if not clip_dir:
    parser.error(f"{args.dalle} was trained without CLIP (model.clip_workdir): pass --clip")
  m = config.model
  # One draw per row (no in-pipeline reranking): every candidate is kept and judged. The
  # task reads this config when sampling (as `jaxt2i eval`'s sampling overrides do).
  with config.unlocked():
    m.num_candidates = 1
  tokenizer = pipeline.load_tokenizer(config.data, args.dalle)
  prompts = runner.eval_prompts(args.num_prompts)
  captions = [c for _, c in prompts]
  k = args.num_candidates
  images = runner.generate_images(task, params, tokenizer, captions, samples_per_prompt=k,
                                  seed=args.seed)
  sample_seconds = time.perf_counter() - start
  repeated = [c for c in captions for _ in range(k)]
  evaluator = shapes_eval.load_evaluator(shapes_eval.nearest_evaluator_size(images.shape[1]))
  verdicts = evaluator.judge(images, repeated)
  measures = {
      "fully correct": np.array([v["correct"] for v in verdicts], np.float64),
      "attributes right": np.array([attribute_fraction(v) for v in verdicts]),
  }
  cosine = clip_score.CLIPScorer.load(clip_dir).cosine(images, repeated)
  cosine = cosine.reshape(len(prompts), k)

  results = {}
  for measure, values in measures.items():
    values = values.reshape(len(prompts), k)
    for split in dict.fromkeys(s for s, _ in prompts):
      rows = [i for i, (s, _) in enumerate(prompts) if s == split]
      results.setdefault(measure, {})[split] = clip_score.rerank_gain(cosine[rows],
                                                                      values[rows])
  data = {"dalle": str(args.dalle), "clip": str(clip_dir), "step": args.step,
          "num_prompts": args.num_prompts, "num_candidates": k, "seed": args.seed,
          "sampling": {f: m[f] for f in ("guidance_scale", "temperature", "top_k", "top_p")},
          "sample_seconds": round(sample_seconds, 1), "load_average": os.getloadavg()[0],
          "results": results}

  settings = (f"guidance {m.guidance_scale:g}, temperature {m.temperature:g}, top-k {m.top_k}, "
              f"top-p {m.top_p:g}")
  md = [f"Run `{args.dalle}`{f' step {args.step}' if args.step else ''}, reranked by CLIP run "
        f"`{clip_dir}`; {args.num_prompts} prompts per split x {k} candidates ({settings}); "
        "judged by the shapes-v1 evaluator. Each cell: the kept image's measure, averaged over "
        "the prompts (fully correct: the fraction of prompts whose kept image is; attributes "
        "right: the fraction of its colour / shape / size per object, place and count that "
        "are).", "",
        "| measure | split | candidates n | one draw (no reranking) | CLIP-best of n | best of "
        "n (perfect reranker) |", "|---|---|---|---|---|---|"]
  for measure, splits in results.items():
    for split, res in splits.items():
      for row in res["curve"]:
        md.append(f"| {measure} | {split} | {row['n']} | {row['single']:.3f} | "
                  f"**{row['reranked']:.3f}** | {row['oracle']:.3f} |")
  md += ["", "CLIP's pairwise accuracy (of two candidates of the same prompt, the better one "
         "has the higher CLIP score; 0.5 = chance): " + "; ".join(
             f"{measure} {split} {res['pairwise_accuracy']:.3f} ({res['pairs']} pairs)"
             for measure, splits in results.items() for split, res in splits.items()) + ".",
         "", f"Sampling {len(images)} images took {sample_seconds:.0f} s; 1-minute load "
         f"average {data['load_average']:.2f}."]
  command = "python benchmarks/clip_rerank.py " + " ".join(sys.argv[1:])
  harness.record("clip_rerank", command, "\n".join(md), data)


if __name__ == "__main__":
  main()
