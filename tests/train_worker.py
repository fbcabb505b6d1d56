"""A training process for tests that need a separate process (kill -9, SIGTERM, multi-host).

  python train_worker.py WORKDIR NUM_STEPS TOKENIZER [--delay S] [--every N] [--mesh d,f,t]
      [--strategy dp] [--coordinator host:port --num_processes P --process_id I]
      [--heartbeat S] [--report FILE] [--recipe clip_shapes:tiny,fsdp [--set FIELD=VALUE]]

--recipe trains a model recipe (tests/helpers.recipe_config) instead of the baseline; its
preset decides the mesh, so --mesh and --strategy are ignored.
"""

import argparse
import json
import logging
import sys

from helpers import SlowSource, recipe_config, records, tiny_config


def main():
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("num_steps", type=int)
  p.add_argument("tokenizer")
  p.add_argument("--delay", type=float, default=0.0)
  p.add_argument("--every", type=int, default=1000)
  p.add_argument("--mesh", default="-1,1,1")
  p.add_argument("--strategy", default="dp")
  p.add_argument("--coordinator", default="")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--heartbeat", type=int, default=5)
  p.add_argument("--report", default="")
  p.add_argument("--recipe", default="")
  p.add_argument("--set", action="append", default=[], help="FIELD=VALUE for --recipe")
  a = p.parse_args()
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)

  from jaxt2i.parallel import mesh as mesh_lib
  if a.coordinator:
    mesh_lib.initialize_distributed({
        "mode": "explicit", "coordinator_address": a.coordinator,
        "num_processes": a.num_processes, "process_id": a.process_id,
        "heartbeat_timeout_s": a.heartbeat, "initialization_timeout_s": 60,
        "shutdown_timeout_s": 10})
  import jax
  from jaxt2i.data.tokenizer import Tokenizer
  from jaxt2i.training.trainer import Trainer

  if a.recipe:
    config = recipe_config(a.recipe, **{"train.num_steps": a.num_steps,
                                        "checkpoint.every_steps": a.every,
                                        **dict(item.split("=", 1) for item in a.set)})
    source = SlowSource(records(size=config.data.image_size), a.delay)
  else:
    data, fsdp, tensor = (int(x) for x in a.mesh.split(","))
    config = tiny_config(**{"train.num_steps": a.num_steps, "checkpoint.every_steps": a.every,
                            "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                            "sharding.strategy": a.strategy})
    source = SlowSource(records(), a.delay)
  trainer = Trainer(config, a.workdir, source=source, tokenizer=Tokenizer.load(a.tokenizer))
  state = trainer.train()
  print(f"FINAL_STEP {int(jax.device_get(state.step))}", flush=True)
  if a.report:
    json.dump({"process": jax.process_index(), "accessed": source.accessed,
               "loss": float(getattr(trainer, "last_metrics", {}).get("train/loss", "nan"))},
              open(a.report, "w"))


if __name__ == "__main__":
  main()
