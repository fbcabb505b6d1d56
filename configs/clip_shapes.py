"""CLIP on shapes-v1: the contrastive image-text model that reranks DALL-E samples and gives
the CLIP score (jaxt2i/eval/clip_score.py).

Launch:
  jaxt2i train --config configs/clip_shapes.py:demo --workdir workdirs/clip
Variants (`:NAME`):
  tiny       CPU smoke test: shapes_v1/tiny (32 px), a few steps, small widths.
  demo       shapes_v1/64, 5-10 minutes on a 2-core CPU.
  reference  shapes_v1/64, the recipe for a good scorer.
Override any field: --config.batch_size=256 --config.model.embed_dim=256
Parallelism presets (`:NAME,PRESET`, e.g. `:demo,fsdp`): dp (replicated weights), fsdp
(weights and Adam state sharded over all devices), fsdp_tp (tensor-parallel width 2).
"""

from jaxt2i.tasks.clip import CLIPTask
from jaxt2i.training.config import apply_parallelism, split_config_arg, trainer_defaults


def get_config(arg: str | None = None):
  variant, parallelism = split_config_arg(arg, "reference")
  config = trainer_defaults()
  config.task = "clip"
  config.model = CLIPTask.default_model_config()
  config.data.name = "shapes_v1/64"       # the benchmark's 64 px build
  config.data.image_size = 64             # 64 -> 32 (stem) -> 16 -> 8 with three conv stages
  config.data.max_caption_length = 16     # the longest shapes-v1 caption is 12 words + EOS
  config.data.vocab_size = 64             # shapes-v1 captions use a few dozen words
  config.data.worker_count = 1            # one grain worker keeps the CPU for the step
  # In-batch negatives: the contrastive task gets harder (and the scorer better) with the batch.
  config.batch_size = 128
  config.train.ema_decay = 0.999          # the EMA params score images at eval and load time
  config.train.log_every = 100            # console line + metrics every N steps
  config.train.eval_every = 1000          # retrieval accuracy on a `test` batch
  config.optim.learning_rate = 1e-3       # peak; AdamW with cosine decay after warm-up
  config.optim.warmup_steps = 200         # linear warm-up from 0
  config.optim.weight_decay = 0.1         # CLIP's decoupled weight decay (matrices only)
  config.optim.b2 = 0.98                  # CLIP's Adam beta2, steadier with a learned scale
  config.optim.eps = 1e-6                 # CLIP's Adam epsilon
  config.checkpoint.every_steps = 1000    # save every N steps (and at the end)
  config.model.embed_dim = 128            # joint embedding width
  config.model.image_channels = (32, 64, 128)  # conv stages: 64 px -> an 8x8x128 map
  config.model.image_width = 256          # image features before the projection
  config.model.text_width = 128           # text encoder width
  config.model.text_depth = 2             # text encoder blocks
  config.model.text_heads = 4             # text encoder heads

  if variant == "reference":
    config.train.num_steps = 5000         # 640k pairs, ~13 epochs of the 50k train split
  elif variant == "demo":
    # ~1-2 steps/s on a 2-core CPU (5-10 minutes); 98% in-batch test retrieval (of 64).
    config.train.num_steps = 600
    config.train.log_every = 50           # console line + metrics every N steps
    config.train.eval_every = 0           # evaluate only at the end
    config.batch_size = 64                # a faster step; still 63 negatives per pair
    config.optim.warmup_steps = 50        # linear warm-up from 0
    config.model.image_width = 128        # image features before the projection
    config.model.text_width = 64          # text encoder width
    config.model.embed_dim = 64           # joint embedding width
    config.checkpoint.every_steps = 600   # save at the end only
  elif variant == "tiny":
    config.data.name = "shapes_v1/tiny"   # 512 training scenes at 32 px
    config.data.image_size = 32           # 32 -> 16 (stem) -> 8 with two conv stages
    config.data.worker_count = 0          # read in the training process
    config.batch_size = 32                # 31 negatives per pair: chance accuracy ~3%
    config.model.embed_dim = 32           # joint embedding width
    config.model.image_channels = (16, 32)  # conv stages: 32 px -> an 8x8x32 map
    config.model.image_width = 64         # image features before the projection
    config.model.text_width = 32          # text encoder width
    config.model.text_depth = 1           # text encoder blocks
    config.model.text_heads = 2           # text encoder heads
    config.train.num_steps = 4            # a smoke test; tests set more
    config.train.log_every = 1            # console line + metrics every step
    config.train.eval_every = 0           # evaluate only at the end
    config.train.ema_decay = 0.9          # the EMA follows within a few steps
    config.optim.learning_rate = 2e-3     # a short run: move fast
    config.optim.warmup_steps = 1         # linear warm-up from 0
    config.checkpoint.every_steps = 100   # save at the end only
  else:
    raise ValueError(f"unknown variant {variant!r} for clip_shapes.py; use tiny, demo or "
                     "reference")
  return apply_parallelism(config, parallelism, tensor=2)
