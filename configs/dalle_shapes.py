"""DALL-E on shapes-v1: a sparse-attention transformer over 16 caption tokens followed by the
image tokens of a trained discrete VAE (configs/dvae_shapes.py: 32x32 for its `reference`,
16x16 for its `demo`), optionally reranked by CLIP (configs/clip_shapes.py).

Launch (after training the dVAE into DVAE_DIR, and for reranking CLIP into CLIP_DIR):
  jaxt2i train --config configs/dalle_shapes.py:demo --workdir workdirs/dalle \\
      --config.model.dvae_workdir=DVAE_DIR [--config.model.clip_workdir=CLIP_DIR]
  jaxt2i eval --workdir workdirs/dalle [--num_candidates 8]
Variants (`:NAME`):
  tiny       CPU smoke test: shapes_v1/tiny (32 px), a few steps, small widths.
  demo       shapes_v1/64, short (minutes on a 2-core CPU).
  reference  shapes_v1/64, the recipe for a good model.
Override any field: --config.model.depth=12 --config.model.attention_patterns='("dense",)*8'
Parallelism presets (`:NAME,PRESET`, e.g. `:demo,fsdp`): dp (replicated weights), fsdp
(weights and Adam state sharded over all devices), fsdp_tp (tensor-parallel width 2).
"""

from jaxt2i.tasks.dalle import DalleTask
from jaxt2i.training.config import apply_parallelism, split_config_arg, trainer_defaults


def get_config(arg: str | None = None):
  variant, parallelism = split_config_arg(arg, "reference")
  config = trainer_defaults()
  config.task = "dalle"
  config.model = DalleTask.default_model_config()
  config.data.name = "shapes_v1/64"       # flat-coloured shapes with captions
  config.data.image_size = 64             # must equal the dVAE run's
  config.data.max_caption_length = 16     # text tokens per stream (longest caption: 12 words)
  config.data.vocab_size = 64             # sentencepiece vocabulary (shared with CLIP)
  config.data.worker_count = 1            # one grain worker keeps decoding off the step
  config.batch_size = 32                  # streams (captions + images) per step
  config.train.ema_decay = 0.999          # samples come from the EMA weights
  config.train.log_every = 100            # console / metrics every N steps
  config.train.eval_every = 1000          # loss, sample grid and shapes-v1 score every N steps
  config.eval.shapes_prompts = 16         # prompts scored by the eval hook
  config.eval.samples_per_prompt = 2      # images per prompt in the eval hook
  config.optim.learning_rate = 1e-3       # peak AdamW step size
  config.optim.warmup_steps = 200         # linear lr warm-up
  config.optim.weight_decay = 0.01        # AdamW decay
  config.checkpoint.every_steps = 500     # save every N steps
  config.model.width = 256                # d_model; 4 heads of 64
  config.model.num_heads = 4              # attention heads
  config.model.depth = 6                  # row, column, row, row, row, conv (the paper's order)
  config.model.conv_kernel = 5            # conv layer window at 16 x 16 tokens (paper: 11 at 32)
  config.model.caption_dropout = 0.1      # lets guidance sharpen caption adherence
  config.model.guidance_scale = 3.0       # logits = uncond + 3 (cond - uncond) when sampling
  config.model.top_k = 32                 # sample among the 32 likeliest codes

  if variant == "reference":
    config.train.num_steps = 6000         # total optimizer steps
    config.model.conv_kernel = 11         # the paper's window, for the reference dVAE's 32 x 32
  elif variant == "demo":
    config.train.num_steps = 1000         # total optimizer steps
    config.train.eval_every = 0           # scored by `jaxt2i eval` afterwards
    config.eval.shapes_prompts = 0        # no eval hook
    config.model.depth = 4                # row, column, row, conv
    config.optim.warmup_steps = 100       # linear lr warm-up
  elif variant == "tiny":
    config.data.name = "shapes_v1/tiny"   # the 32 px test split, built in seconds
    config.data.image_size = 32           # 8 x 8 tokens with the tiny dVAE
    config.data.worker_count = 0          # no worker processes in tests
    config.batch_size = 8                 # streams per step
    config.model.width = 32               # d_model
    config.model.num_heads = 2            # attention heads
    config.model.depth = 4                # every pattern of the paper's order
    config.model.conv_kernel = 3          # conv window
    config.train.num_steps = 4            # total optimizer steps
    config.train.log_every = 1            # metrics every step
    config.train.eval_every = 0           # no eval hook
    config.eval.shapes_prompts = 0        # no eval hook
    config.train.ema_decay = 0.9          # EMA that moves within a few steps
    config.optim.warmup_steps = 1         # linear lr warm-up
    config.checkpoint.every_steps = 100   # only the final checkpoint
  else:
    raise ValueError(f"unknown variant {variant!r} for dalle_shapes.py; use tiny, demo or "
                     "reference")
  return apply_parallelism(config, parallelism, tensor=2)
