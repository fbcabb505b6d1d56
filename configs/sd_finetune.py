"""Fine-tune a Stable Diffusion checkpoint (a local diffusers folder) with the shared trainer.

  jaxt2i train --config configs/sd_finetune.py:/path/to/stable-diffusion-v1-5 \\
      --workdir gs://bucket/runs/sd-ft --config.data.name=image_text_folder/my_photos \\
      --config.data.data_dir=gs://bucket/data

The run starts from the folder's U-Net, VAE and CLIP text encoder (model.pretrained); the VAE
is frozen, the text encoder too unless --config.model.text_trainable=True, and the U-Net is
trained with the folder's noise schedule and parameterisation, caption dropout 10% for
guidance. Images are resized and center-cropped to the model's size (512 px for SD 1.5);
--config.data.image_size=256 trains smaller. The result samples with `jaxt2i.load(workdir)`
and exports with `jaxt2i convert to-diffusers WORKDIR OUT`.
"""

from jaxt2i.convert.diffusers_pipeline import config_from_diffusers


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("name the Stable Diffusion folder: --config "
                     "configs/sd_finetune.py:/path/to/stable-diffusion-folder")
  config = config_from_diffusers(arg, dtype="bfloat16")
  config.batch_size = 32                # global batch; 1e-5 suits 32 images of 512 px
  config.data.name = "image_text_folder/finetune"  # build one with `jaxt2i data build`
  config.data.worker_count = 4
  config.train.num_steps = 5000
  config.train.ema_decay = 0.9999
  config.train.log_every = 50
  config.train.eval_every = 0           # sampling 512 px images is slow on small machines
  config.optim.learning_rate = 1e-5
  config.optim.warmup_steps = 500
  config.optim.weight_decay = 1e-2
  config.checkpoint.every_steps = 500
  config.mesh.fsdp = 1                  # e.g. --config.mesh.fsdp=8 --config.sharding.strategy=fsdp
  return config
