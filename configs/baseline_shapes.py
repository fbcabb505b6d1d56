"""Caption -> image regression baseline on shapes-v1 (the smallest task; trains in seconds).

Launch (one host, any number of devices):
  jaxt2i train --config configs/baseline_shapes.py --workdir workdirs/baseline
Variants (`--config configs/baseline_shapes.py:tiny`):
  tiny     CPU smoke test: shapes_v1/tiny (32 px), a few dozen steps.
  default  shapes_v1/64, 800 steps (a few minutes on a 2-core CPU).
Override any field: --config.batch_size=128 --config.mesh.fsdp=4 --config.sharding.strategy=fsdp
"""

from jaxt2i.tasks.baseline import CaptionRegressionTask
from jaxt2i.training.config import trainer_defaults


def get_config(arg: str | None = None):
  config = trainer_defaults()
  config.task = "caption_regression"
  config.model = CaptionRegressionTask.default_model_config()
  config.model.channels = 16  # the 64x64 convs dominate the step time on a CPU
  config.batch_size = 32
  config.data.name = "shapes_v1/64"
  config.data.image_size = 64
  config.data.max_caption_length = 16  # the longest shapes-v1 caption is 12 words + EOS
  config.data.vocab_size = 64
  config.train.num_steps = 800
  config.train.log_every = 50
  config.train.eval_every = 400
  # shapes-v1 score of 8 test + 8 test_heldout prompts at every eval (TensorBoard: eval/shapes_*).
  config.eval.shapes_prompts = 8
  config.eval.samples_per_prompt = 1  # the baseline is deterministic
  config.optim.learning_rate = 2e-3
  config.checkpoint.every_steps = 400

  if arg == "tiny":
    config.data.name = "shapes_v1/tiny"
    config.data.image_size = 32
    config.model.base_resolution = 8
    config.model.mlp_dim = 64
    config.model.channels = 16
    config.batch_size = 16
    config.train.num_steps = 40
    config.train.log_every = 10
    config.train.eval_every = 0
    config.eval.shapes_prompts = 0
    config.optim.warmup_steps = 5
    config.checkpoint.every_steps = 20
  elif arg not in (None, "", "default"):
    raise ValueError(f"unknown variant {arg!r} for configs/baseline_shapes.py; use tiny or default")
  return config
