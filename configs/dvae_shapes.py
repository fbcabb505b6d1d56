"""The DALL-E discrete VAE on shapes-v1: 64x64 images -> a grid of tokens of a 512-code book:
32x32 (f = 2, the paper's grid; `reference`) or 16x16 (f = 4; `demo`, `tiny`).

Launch:
  jaxt2i train --config configs/dvae_shapes.py:demo --workdir workdirs/dvae
Variants (`:NAME`):
  tiny       CPU smoke test: shapes_v1/tiny (32 px), a few steps, small widths.
  demo       shapes_v1/64, short (~8 minutes on a 2-core CPU): a first stage for DALL-E demos.
  reference  shapes_v1/64, 32x32 tokens: the recipe for good hard-token reconstructions.
Override any field: --config.model.vocab_size=1024 --config.batch_size=64
Parallelism presets (`:NAME,PRESET`, e.g. `:demo,fsdp`): dp (replicated weights), fsdp
(weights and Adam state sharded over all devices), fsdp_tp (tensor-parallel width 2).
The run directory is what the DALL-E task's `model.dvae_workdir` points at.
"""

from jaxt2i.tasks.dvae import DiscreteVAETask
from jaxt2i.training.config import apply_parallelism, split_config_arg, trainer_defaults


def get_config(arg: str | None = None):
  variant, parallelism = split_config_arg(arg, "reference")
  config = trainer_defaults()
  config.task = "dvae"
  config.model = DiscreteVAETask.default_model_config()
  config.data.name = "shapes_v1/64"       # flat-coloured shapes with captions (captions unused)
  config.data.image_size = 64             # 64 px / f: 16 x 16 tokens at f = 4, 32 x 32 at 2
  config.data.worker_count = 1            # one grain worker keeps decoding off the step
  config.batch_size = 32                  # images per step
  config.train.ema_decay = 0.0            # the dVAE is used as trained (frozen by DALL-E)
  config.train.log_every = 100            # console / metrics every N steps
  config.train.eval_every = 1000          # reconstruction grid + PSNR every N steps
  config.optim.learning_rate = 1e-3       # peak Adam step size
  config.optim.weight_decay = 0.0         # none in the runs measured below (the paper: 1e-4)
  config.checkpoint.every_steps = 500     # save every N steps
  config.model.vocab_size = 512           # codes; shapes-v1 needs far fewer than 8192
  config.model.hidden = 16                # encoder widths 16 / 32 / 64, decoder 64 / 32 / 16
  config.model.init_width = 64            # decoder width after the code input
  config.model.blocks_per_group = 1       # residual blocks per group (3 groups at f = 4)
  config.model.downsample_factor = 4      # 16 x 16 tokens (2: 32 x 32, 8: 8 x 8)
  # Squared error, not the paper's logit-Laplace NLL: shapes-v1 is ~95% exactly flat black
  # background, where that NLL has no lower bound (the log-scale runs to -inf); in our runs
  # its ever larger gradients there swamped everything else and the codes never learned the
  # shapes (hard-token PSNR stuck at the all-background ~18 dB).
  config.model.reconstruction = "mse"
  # beta in squared-pixel units: the paper-scaled 1.6 nats (tasks/dvae.py) times 2 sigma^2 for
  # a pixel noise sigma ~0.02 (~1e-3); much larger values held the posteriors uniform.
  config.model.kl_weight = 1e-3

  config.optim.warmup_steps = 50          # linear lr warm-up
  config.model.kl_warmup_steps = 500      # beta 0 -> kl_weight over these steps
  # A slow anneal: the hard-token reconstructions were better at the same step with the
  # relaxation still soft (1500 steps: 24.0 dB at step 500) than fully annealed (400 steps:
  # 21.8 dB at step 500, shapes in place but most colours wrong).
  config.model.temperature_steps = 1500   # temperature 1 -> 1/16 over these steps

  if variant == "reference":
    config.train.num_steps = 3000         # total optimizer steps
    # 32 x 32 tokens of 2 x 2 px (the paper's grid: 256 px at f = 8). With 16 x 16 tokens of
    # 4 x 4 px the same recipe ends at 31.5 dB and 0.773 fully correct: a small cross's 3.8 px
    # bars are thinner than a token and no code draws them (50 of 54 lost). At f = 2, on 1000
    # test images: 32.3 dB, 0.955 fully correct (small crosses 23 of 176 lost); 0.65 steps/s
    # on a 2-core CPU. The transformer's stream is then 4x longer, its step 4.5x slower
    # (configs/dalle_shapes.py:reference; benchmarks/RESULTS.md).
    config.model.downsample_factor = 2    # 32 x 32 tokens
    # Codebook restarts (tasks/dvae.py) every 100 steps from 300 to 2200, up to 32 codes each
    # time. On 1000 test images at f = 4 (2-core CPU, 1.8 steps/s, 28 min) they took the hard
    # tokens from 29.7 to 31.5 dB PSNR, 19 to 45 codes in use, and the reconstructions'
    # shapes-v1 score from 0.676 to 0.773 fully correct (small triangles 10 -> 1 of 51 wrong).
    config.model.restart_every = 100      # steps between restarts
    config.model.restart_start = 300      # first restart (the relaxation still soft)
    config.model.restart_until = 2200     # the last 800 steps train the final codebook
    config.model.restart_count = 32       # at most this many codes per restart
  elif variant == "demo":
    # ~22 min at 0.75 steps/s on a 2-core AMD EPYC shared with another run (less alone).
    # With restarts and the anneal over the run, hard-token reconstructions of 300 test
    # images: 26.1 dB, 0.287 fully correct (colour / shape 0.66 / 0.56). The earlier demo, 500
    # steps without restarts, temperature over 1500 steps: 21.1 dB, 0.05 (colour 0.23).
    config.train.num_steps = 1000         # total optimizer steps
    config.train.log_every = 50           # console / metrics every N steps
    config.train.eval_every = 1000        # one eval, at the end
    config.model.temperature_steps = 1000  # temperature 1 -> 1/16 by the end
    config.model.restart_every = 100      # codebook restarts, as in the reference
    config.model.restart_start = 300      # first restart
    config.model.restart_until = 800      # the last 200 steps train the final codebook
    config.model.restart_count = 32       # at most this many codes per restart
  elif variant == "tiny":
    config.data.name = "shapes_v1/tiny"   # the 32 px test split, built in seconds
    config.data.image_size = 32           # 8 x 8 tokens
    config.data.worker_count = 0          # no worker processes in tests
    config.batch_size = 8                 # images per step
    config.model.vocab_size = 64          # codes
    config.model.init_width = 16          # decoder width after the code input
    config.model.kl_warmup_steps = 10     # beta 0 -> kl_weight over these steps
    config.model.temperature_steps = 20   # temperature 1 -> 1/16 over these steps
    config.train.num_steps = 4            # total optimizer steps
    config.train.log_every = 1            # metrics every step
    config.train.eval_every = 0           # eval only at the end
    config.optim.warmup_steps = 1         # linear lr warm-up
    config.checkpoint.every_steps = 100   # only the final checkpoint
  else:
    raise ValueError(f"unknown variant {variant!r} for dvae_shapes.py; use tiny, demo or "
                     "reference")
  return apply_parallelism(config, parallelism, tensor=2)
