"""The DALL-E discrete VAE on shapes-v1: 64x64 images -> 16x16 tokens of a 512-code book (f = 4).

Launch:
  jaxt2i train --config configs/dvae_shapes.py:demo --workdir workdirs/dvae
Variants (`:NAME`):
  tiny       CPU smoke test: shapes_v1/tiny (32 px), a few steps, small widths.
  demo       shapes_v1/64, short (a few minutes on a 2-core CPU): the `make demo` first stage.
  reference  shapes_v1/64, the recipe for good hard-token reconstructions.
Override any field: --config.model.vocab_size=1024 --config.batch_size=64
The run directory is what the DALL-E task's `model.dvae_workdir` points at.
"""

from jaxt2i.tasks.dvae import DiscreteVAETask
from jaxt2i.training.config import trainer_defaults


def get_config(arg: str | None = None):
  variant = arg or "reference"
  config = trainer_defaults()
  config.task = "dvae"
  config.model = DiscreteVAETask.default_model_config()
  config.data.name = "shapes_v1/64"       # flat-coloured shapes with captions (captions unused)
  config.data.image_size = 64             # 64 px / f 4 = 16 x 16 tokens per image
  config.data.worker_count = 1            # one grain worker keeps decoding off the step
  config.batch_size = 32                  # images per step
  config.train.ema_decay = 0.0            # the dVAE is used as trained (frozen by DALL-E)
  config.train.log_every = 100            # console / metrics every N steps
  config.train.eval_every = 1000          # reconstruction grid + PSNR every N steps
  config.optim.learning_rate = 1e-3       # peak Adam step size
  config.optim.weight_decay = 0.0         # none: the codes' logits need their full scale
  config.optim.warmup_steps = 100         # linear lr warm-up
  config.checkpoint.every_steps = 500     # save every N steps
  config.model.vocab_size = 512           # codes; shapes-v1 needs far fewer than 8192
  config.model.hidden = 32                # flat colours need little width
  config.model.init_width = 64            # decoder width after the code input
  config.model.blocks_per_group = 1       # residual blocks per group (3 groups at f = 4)
  config.model.downsample_factor = 4      # 16 x 16 tokens (8 would give 8 x 8)

  if variant == "reference":
    config.train.num_steps = 6000         # total optimizer steps
    config.model.kl_warmup_steps = 1000   # beta 0 -> kl_weight over these steps
    config.model.temperature_steps = 4000  # temperature 1 -> 1/16 over these steps
  elif variant == "demo":
    config.train.num_steps = 500          # total optimizer steps
    config.train.log_every = 50           # console / metrics every N steps
    config.train.eval_every = 500         # one eval, at the end
    config.optim.warmup_steps = 50        # linear lr warm-up
    config.model.kl_warmup_steps = 200    # beta 0 -> kl_weight over these steps
    config.model.temperature_steps = 400  # temperature 1 -> 1/16 over these steps
  elif variant == "tiny":
    config.data.name = "shapes_v1/tiny"   # the 32 px test split, built in seconds
    config.data.image_size = 32           # 8 x 8 tokens
    config.data.worker_count = 0          # no worker processes in tests
    config.batch_size = 8                 # images per step
    config.model.vocab_size = 64          # codes
    config.model.hidden = 16              # widths 16 / 32 / 64
    config.model.init_width = 16          # decoder width after the code input
    config.model.kl_warmup_steps = 10     # beta 0 -> kl_weight over these steps
    config.model.temperature_steps = 20   # temperature 1 -> 1/16 over these steps
    config.train.num_steps = 4            # total optimizer steps
    config.train.log_every = 1            # metrics every step
    config.train.eval_every = 0           # eval only at the end
    config.optim.warmup_steps = 1         # linear lr warm-up
    config.checkpoint.every_steps = 100   # only the final checkpoint
  else:
    raise ValueError(f"unknown variant {arg!r} for configs/dvae_shapes.py; use tiny, demo or "
                     "reference")
  return config
