"""LoRA on a Stable Diffusion checkpoint (a local diffusers folder) with the shared trainer.

  jaxt2i train --config configs/sd_lora.py:/path/to/stable-diffusion-v1-5 \\
      --workdir gs://bucket/runs/sd-lora --config.data.name=image_text_folder/my_photos \\
      --config.data.data_dir=gs://bucket/data

Rank-`lora_rank` adapters on the U-Net's attention projections (to_q, to_k, to_v, to_out.0;
--config.model.lora_text_encoder=True adds the CLIP text encoder's) are the only trained
weights: the base model stays in the folder, out of the optimizer state and the checkpoints
(a few MB each for SD 1.5 at rank 4). Resuming and sampling read the folder again, so keep it
where the run found it. The result samples with `jaxt2i.load(workdir)` (adapters merged) and
exports with `jaxt2i convert to-diffusers WORKDIR OUT --lora_only` (diffusers'
`pipe.load_lora_weights(OUT)` reads it) or, without --lora_only, as a merged checkpoint.
"""

import importlib.util
import os


def _finetune_config(arg):
  """configs/sd_finetune.py's config (loaded by path: configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd_finetune.py")
  spec = importlib.util.spec_from_file_location("sd_finetune", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None):
  config = _finetune_config(arg)
  config.model.lora_rank = 4
  config.model.lora_alpha = 4.0         # scale alpha / rank = 1
  config.batch_size = 8
  config.train.num_steps = 2000
  config.train.ema_decay = 0.0          # adapters train in few steps; EMA would lag them
  config.optim.learning_rate = 1e-4     # diffusers' train_text_to_image_lora.py default
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  config.checkpoint.every_steps = 250
  return config
