"""A ControlNet on shapes-v1 beside a trained latent-diffusion run (Zhang et al. 2023).

  jaxt2i train --config configs/controlnet_shapes.py:runs/demo/ldm \\
      --workdir runs/demo/controlnet
  python benchmarks/controlnet_shapes.py --workdir runs/demo/controlnet   # place accuracy

The base run (its EMA U-Net, text encoder and autoencoder) stays fixed and out of the
checkpoints; the ControlNet starts as a copy of the base U-Net's encoder with zero
convolutions, and learns from control images derived from each training image:
`--config.model.control_image=mask` (default: the objects' silhouettes on the black
background, which fix position, size and shape but not colour) or `edges` (Sobel edges).
Sampling: `jaxt2i.load(workdir)(prompts, control_image=...)`; without a control image the run
samples as its base.

The argument is the base run's workdir; `BASE,tiny` shrinks the schedule for tests.
"""

import json
import os

from jaxt2i.models.controlnet import fields_from_unet
from jaxt2i.tasks.ldm import LatentDiffusionTask
from jaxt2i.training import config as config_lib


def get_config(arg: str | None = None):
  base, _, variant = (arg or "").partition(",")
  if not base:
    raise ValueError("name the base latent-diffusion run: --config "
                     "configs/controlnet_shapes.py:runs/demo/ldm")
  path = os.path.join(base, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{base} is not a jaxt2i run: no config.json")
  with open(path) as f:
    config = config_lib.from_json_dict(json.load(f))
  if config.task != LatentDiffusionTask.name:
    raise ValueError(f"{base} is a {config.task!r} run, not latent diffusion")
  task = LatentDiffusionTask(config)
  m = config.model
  m.base_workdir = os.path.abspath(base)
  m.lora_rank = 0
  m.control_image = "mask"
  m.controlnets = {"controlnet_0": fields_from_unet(
      task.unet, conditioning_channels=3, downsample_factor=task.autoencoder.downsample_factor)}
  config.train.num_steps = 1500
  config.train.ema_decay = 0.999
  config.train.eval_every = 500
  config.train.log_every = 50
  config.optim.learning_rate = 1e-4     # the ControlNet paper's rate
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  config.checkpoint.every_steps = 250
  config.eval.shapes_prompts = 0        # samples without control: the base's score
  if variant == "tiny":
    config.train.num_steps = 2
    config.train.eval_every = 0
    config.train.log_every = 1
    config.checkpoint.every_steps = 100
  return config
