"""The latent-diffusion first stage on shapes-v1: a KL autoencoder, 64x64 -> 16x16 latents (f = 4),
4 channels (demo) or 8 (reference).

Launch:
  jaxt2i train --config configs/autoencoder_shapes.py:demo --workdir workdirs/autoencoder
Variants (`:NAME`):
  tiny       CPU smoke test: shapes_v1/tiny (32 px), a few steps, small widths.
  demo       shapes_v1/64, short: the `make demo` first stage.
  reference  shapes_v1/64, the recipe for a good first stage (PatchGAN after 1000 steps).
  vq         the reference with a VQ (VQ-GAN) bottleneck instead of KL.
Override any field: --config.model.kind=vq --config.batch_size=64
Parallelism presets (`:NAME,PRESET`, e.g. `:demo,fsdp`): dp (replicated weights), fsdp
(weights and Adam state sharded over all devices), fsdp_tp (tensor-parallel width 2).
"""

from jaxt2i.tasks.autoencoder import AutoencoderTask
from jaxt2i.training.config import apply_parallelism, split_config_arg, trainer_defaults


def get_config(arg: str | None = None):
  variant, parallelism = split_config_arg(arg, "reference")
  config = trainer_defaults()
  config.task = "autoencoder"
  config.model = AutoencoderTask.default_model_config()
  config.data.name = "shapes_v1/64"
  config.data.image_size = 64
  config.data.worker_count = 1
  config.batch_size = 32
  config.train.ema_decay = 0.0    # the first stage is used as trained
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.optim.learning_rate = 1e-3
  config.optim.b1, config.optim.b2 = 0.5, 0.9  # the VQ-GAN / LDM autoencoder betas
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = 100
  config.checkpoint.every_steps = 500
  # Flat-coloured shapes need little width; the full-resolution level dominates the cost
  # (16 channels at 64x64: ~45 images/s for a train step on a 2-core CPU).
  config.model.block_out_channels = (16, 32, 32)
  config.model.norm_groups = 8
  config.model.disc_channels = 32
  config.model.disc_layers = 2

  if variant in ("reference", "vq"):
    # 0.64 steps/s on a 2-core Xeon (40 minutes), 0.35 on a 2-core EPYC (66 minutes).
    config.train.num_steps = 1500
    config.model.disc_start = 1000
    # 8 latent channels, not SD's 4: on 1000 `test` images the reconstructions at step 1500
    # measured 32.49 dB and 0.939 fully correct (colour 0.999, shape 0.960) against 31.18 dB
    # and 0.895 (colour 0.964) with 4, whose PatchGAN phase pushed small orange objects
    # towards red or yellow (benchmarks/RESULTS.md, LDM notes). The U-Net's cost barely moves:
    # only its first and last convolutions see the channels.
    config.model.latent_channels = 8
    if variant == "vq":
      config.model.kind = "vq"
      config.model.num_codes = 512
  elif variant == "demo":
    # ~5 minutes on a 2-core CPU (1.4 steps/s), reconstruction alone (the discriminator makes
    # a step ~30% slower): PSNR ~27 dB. The reference's PatchGAN phase is what turns blurred
    # corners back into squares and triangles the shapes-v1 scorer recognises.
    config.train.num_steps = 400
    config.train.log_every = 50
    config.train.eval_every = 400
    config.optim.warmup_steps = 50
    config.model.disc_weight = 0.0
  elif variant == "tiny":
    config.data.name = "shapes_v1/tiny"
    config.data.image_size = 32
    config.data.worker_count = 0
    config.model.block_out_channels = (16, 32)
    config.model.mid_attention = True
    config.model.disc_channels = 16
    config.model.disc_start = 2
    config.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every = 1
    config.train.eval_every = 0
    config.optim.warmup_steps = 1
    config.checkpoint.every_steps = 100
  else:
    raise ValueError(f"unknown variant {variant!r} for autoencoder_shapes.py; use tiny, "
                     "demo, reference or vq")
  return apply_parallelism(config, parallelism, tensor=2)
