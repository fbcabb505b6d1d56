"""Latent diffusion on shapes-v1: a text-conditioned U-Net on the latents of a trained
autoencoder (configs/autoencoder_shapes.py), with classifier-free guidance.

Launch (after training the first stage into AE_DIR):
  jaxt2i train --config configs/ldm_shapes.py:demo --workdir workdirs/ldm \\
      --config.model.autoencoder_workdir=AE_DIR
Variants (`:NAME`):
  tiny       CPU smoke test: shapes_v1/tiny (32 px), a few steps, small widths.
  demo       shapes_v1/64, short (the `make demo` second stage).
  reference  shapes_v1/64, the recipe for a good model.
Override any field: --config.model.prediction_type=v_prediction --config.model.sampler=dpmpp_2m
Parallelism presets (`:NAME,PRESET`, e.g. `:demo,fsdp`): dp (replicated weights), fsdp
(weights and Adam state sharded over all devices), fsdp_tp (tensor-parallel width 2).
"""

from jaxt2i.tasks.ldm import LatentDiffusionTask
from jaxt2i.training.config import apply_parallelism, split_config_arg, trainer_defaults


def get_config(arg: str | None = None):
  variant, parallelism = split_config_arg(arg, "reference")
  config = trainer_defaults()
  config.task = "latent_diffusion"
  config.model = LatentDiffusionTask.default_model_config()
  config.data.name = "shapes_v1/64"
  config.data.image_size = 64
  config.data.max_caption_length = 16  # the longest shapes-v1 caption is 12 words + EOS
  config.data.vocab_size = 64
  config.data.worker_count = 1
  config.batch_size = 32
  config.train.ema_decay = 0.999
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.eval.shapes_prompts = 16
  config.eval.samples_per_prompt = 2
  config.optim.learning_rate = 4e-4
  config.optim.warmup_steps = 200
  config.optim.weight_decay = 0.0
  config.checkpoint.every_steps = 500
  config.model.text_width = 128
  config.model.text_depth = 2
  # 16x16 latents (4 channels from the demo first stage, 8 from the reference one): levels at
  # 16, 8 and 4 latent pixels, cross-attention to the caption at every level (where an object
  # sits and what it looks like are both caption-dependent).
  config.model.block_out_channels = (64, 128, 128)
  config.model.layers_per_block = 1
  config.model.down_block_types = ("CrossAttnDownBlock2D",) * 3
  config.model.up_block_types = ("CrossAttnUpBlock2D",) * 3
  config.model.norm_num_groups = 16
  config.model.num_sampling_steps = 25
  # Where an object goes is decided at the noisiest timesteps. Under the plain scaled-linear
  # schedule these 16x16 latents still show each object's place at t = 999 (a rendered scene's
  # x_0 prediction follows x_t, not a caption naming another cell), so an epsilon / min-SNR
  # model never learns place from text: one-object place 0.11 (chance) at step 3000. SNRs /
  # 3^2 hide the objects at the top ~20% of timesteps, and v-prediction with uniform weighting
  # trains the x_0 error there at full weight: place 1.00 at step 1000 (benchmarks/RESULTS.md,
  # ldm_place). At the demo's length it also lifts colour (0.23 -> 0.59) and count
  # (0.16 -> 0.66) on `test` (benchmarks/RESULTS.md, LDM notes).
  config.model.prediction_type = "v_prediction"
  config.model.snr_shift = 3.0
  config.model.loss_weighting = "uniform"

  if variant == "reference":
    # 0.5-0.6 steps/s on a 2-core Xeon (0.58 alone), 0.33-0.37 on a 2-core AMD EPYC (Zen 3):
    # two to three hours, after the first stage's 40-70 minutes.
    config.train.num_steps = 4000
  elif variant == "demo":
    # ~2 steps/s on a 2-core CPU: about 8 minutes. Scored by `jaxt2i eval` afterwards.
    config.train.num_steps = 900
    config.train.eval_every = 0
    config.eval.shapes_prompts = 0
    config.optim.learning_rate = 6e-4
    config.optim.warmup_steps = 100
    config.model.block_out_channels = (32, 64, 64)
    config.model.down_block_types = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D")
    config.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  elif variant == "tiny":
    config.data.name = "shapes_v1/tiny"
    config.data.image_size = 32
    config.data.worker_count = 0
    config.batch_size = 8
    config.model.text_width = 32
    config.model.text_depth = 1
    config.model.text_heads = 2
    config.model.block_out_channels = (16, 32)
    config.model.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
    config.model.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
    config.model.layers_per_block = 1
    config.model.attention_head_dim = 2
    config.model.norm_num_groups = 8
    config.model.num_sampling_steps = 4
    # The tests' settings: epsilon prediction, min-SNR weighting, the plain schedule.
    config.model.prediction_type = "epsilon"
    config.model.snr_shift = 1.0
    config.model.loss_weighting = "min_snr"
    config.train.num_steps = 4
    config.train.log_every = 1
    config.train.eval_every = 0
    config.eval.shapes_prompts = 0
    config.train.ema_decay = 0.9
    config.optim.warmup_steps = 1
    config.checkpoint.every_steps = 100
  else:
    raise ValueError(f"unknown variant {variant!r} for ldm_shapes.py; use tiny, demo or "
                     "reference")
  return apply_parallelism(config, parallelism, tensor=2)
