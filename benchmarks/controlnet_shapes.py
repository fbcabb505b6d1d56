"""Does the control image constrain position? shapes-v1 scores of a ControlNet run
(configs/controlnet_shapes.py) with and without control.

  python benchmarks/controlnet_shapes.py --workdir RUN [--num_prompts 64] [--split test]

For the first N records of a shapes-v1 split: the caption, and the control image derived from
the record's real image the way the run was trained (model.control_image). The run samples
every caption twice from the same seed: with the control image, and without (the base model
alone). Both sets are scored by the shapes-v1 evaluator; place accuracy is the number the
ControlNet should move. Recorded as `controlnet_shapes` in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

import harness  # noqa: E402
import jaxt2i  # noqa: E402
from jaxt2i.data import shapes as shapes_data  # noqa: E402
from jaxt2i.eval import shapes as shapes_eval  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the ControlNet run")
  parser.add_argument("--num_prompts", type=int, default=64)
  parser.add_argument("--split", default="test", choices=("test", "test_heldout"))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--no_record", action="store_true", help="print only")
  args = parser.parse_args()

  pipe = jaxt2i.load(args.workdir)
  m = pipe.config.model
  if not m.control_image:
    sys.exit(f"{args.workdir} is not a ControlNet run (model.control_image is empty)")
  size = pipe.config.data.image_size
  records = [shapes_data.example(args.split, i, size) for i in range(args.num_prompts)]
  captions = [r["caption"] for r in records]
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
  low, high = pipe.config.data.value_range
  control = np.asarray(pipe.task.control_from_images(low + (high - low) * images))
  start = time.perf_counter()
  out = {"with control": [], "without control": []}
  for i in range(0, len(captions), args.batch):
    batch = captions[i:i + args.batch]
    out["with control"].append(pipe(batch, seed=i, output="np",
                                    control_image=control[i:i + args.batch]))
    out["without control"].append(pipe(batch, seed=i, output="np"))
    print(f"{i + len(batch)}/{len(captions)} prompts", flush=True)
  seconds = time.perf_counter() - start
  scorer = shapes_eval.load_evaluator(shapes_eval.nearest_evaluator_size(size))
  reports = {k: scorer.score(np.concatenate(v), captions) for k, v in out.items()}
  attributes = ("color", "shape", "size", "place", "count")
  rows = [f"| {k} | {r['fully_correct']:.1%} | " + " | ".join(
      f"{r['per_attribute'][a]:.1%}" for a in attributes) + " |" for k, r in reports.items()]
  md = (f"Run `{args.workdir}` (control image `{m.control_image}`, base `{m.base_workdir}`), "
        f"{args.num_prompts} `{args.split}` captions, one image each, {m.sampler} "
        f"{m.num_sampling_steps} steps, guidance {m.guidance_scale}; the control images come "
        "from the records' real images. Sampling both sets took "
        f"{seconds:.0f} s.\n\n| sampling | fully correct | " + " | ".join(attributes)
        + " |\n|---|---|" + "---|" * len(attributes) + "\n" + "\n".join(rows) + "\n")
  print(md)
  if not args.no_record:
    harness.record("controlnet_shapes",
                   f"python benchmarks/controlnet_shapes.py --workdir {args.workdir} "
                   f"--num_prompts {args.num_prompts} --split {args.split}", md,
                   {k: {"fully_correct": r["fully_correct"], **r["per_attribute"]}
                    for k, r in reports.items()})


if __name__ == "__main__":
  main()
