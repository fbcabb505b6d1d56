"""Shared pieces for trainer tests: tiny data, tokenizer, config, checkpoint reading."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "train_worker.py"


@functools.lru_cache(maxsize=None)
def records(n: int = 128, size: int = 32, split: str = "train") -> tuple[dict, ...]:
  from jaxt2i.data import shapes
  return tuple(shapes.generate(split, n, image_size=size))


class SlowSource:
  """A record list whose reads take `delay` seconds: makes steps slow enough to interrupt."""

  def __init__(self, items, delay: float = 0.0):
    self.items, self.delay = list(items), delay
    self.accessed: list[int] = []  # indices read in this process, in order

  def __len__(self):
    return len(self.items)

  def __repr__(self):  # grain checks that a restored run reads the same source
    return f"SlowSource({len(self.items)} records)"

  def __getitem__(self, i):
    if self.delay:
      time.sleep(self.delay)
    self.accessed.append(int(i))
    return self.items[i]


def tokenizer_path(directory: Path) -> Path:
  from jaxt2i.data.tokenizer import train_tokenizer
  path = Path(directory) / "shapes.model"
  if not path.exists():
    train_tokenizer((r["caption"] for r in records()), str(path), vocab_size=64)
  return path


def tiny_config(**overrides):
  sys.path.insert(0, str(REPO))
  from configs.baseline_shapes import get_config
  c = get_config("tiny")
  c.data.image_size = 32
  c.data.vocab_size = 64
  c.data.max_caption_length = 20
  c.model.width = 16
  c.model.mlp_dim = 32
  c.model.channels = 8
  c.batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.ema_decay = 0.99
  c.train.eval_at_end = False  # the few tests that read the final eval turn it on
  c.optim.warmup_steps = 2
  c.optim.decay_steps = 20  # fixed, so runs extended to more steps keep the same lr
  c.checkpoint.every_steps = 1000
  c.checkpoint.async_save = True
  return override(c, **overrides)


def recipe_config(recipe: str, **overrides):
  """A model recipe's config at test size: `recipe` is "clip_shapes:tiny,fsdp" (module in
  configs/ : its get_config argument), trained a few steps on records() with batch 16."""
  sys.path.insert(0, str(REPO))
  import importlib
  name, _, arg = recipe.partition(":")
  c = importlib.import_module(f"configs.{name}").get_config(arg or "tiny")
  c.batch_size = 16
  c.train.num_steps = 2
  c.train.log_every = 1
  c.train.eval_every = 0
  c.checkpoint.every_steps = 1000
  c.data.worker_count = 0
  return override(c, **overrides)


def train_run(config, workdir, **kwargs):
  """Trains `config` into `workdir` on one device (model-family tests: they compile much
  faster unpartitioned; the trainer's multi-device paths are tested in test_trainer.py);
  returns (trainer, final state)."""
  import jax
  from jaxt2i.training.trainer import Trainer
  trainer = Trainer(config, workdir, devices=jax.devices()[:1], **kwargs)
  try:
    state = trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  return trainer, state


# For fixture runs that are read, not evaluated: skipping the final eval skips compiling it.
NO_FINAL_EVAL = {"train.eval_at_end": False}


def random_params(boxed, seed: int = 2):
  """Random float32 params of the shapes in `boxed` (jax.eval_shape of a model's init):
  kernels fan-in scaled like lecun_normal, norm scales near 1, the rest near 0. Tests draw
  params this way rather than by a jitted `init`, whose compile (tens of seconds of XLA for
  the random initialisers) would dominate them; init is still traced in full by eval_shape."""
  import jax
  import jax.numpy as jnp
  from jaxt2i.parallel import partitioning
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", None)
    if name == "kernel":
      parent = getattr(path[-2], "key", None) if len(path) > 1 else None
      # A 3-D attention output kernel is (heads, head_dim, out): its fan-in is the first two.
      fan_in = np.prod(leaf.shape[:2] if len(leaf.shape) == 3 and parent in (
          "to_out_0", "out") else leaf.shape[:-1])
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1)),
                         jnp.float32)
    base = 1.0 if name == "scale" else 0.0
    return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, partitioning.unbox(boxed))


def random_run(config, workdir, *, seed: int = 2) -> Path:
  """`workdir` as a run of `config` holding random weights (random_params; the task's
  pretrained subtrees, e.g. an LDM's first stage, from Task.initial_values), written by
  save_params like converted weights: config.json and a checkpoint at step num_steps. For
  tests that need a run to load or freeze (first stages, conversions), not a trained one:
  nothing is compiled. Derived fields (an LDM's latent_scale) must be set in `config`."""
  import jax
  import jax.numpy as jnp
  from jaxt2i.tasks.base import get_task
  from jaxt2i.training import config as config_lib
  from jaxt2i.training.checkpoint import save_params
  task = get_task(config)
  size, length = config.data.image_size, config.data.max_caption_length
  dummy = {"image": jnp.zeros((1, size, size, 3)), "tokens": jnp.zeros((1, length), jnp.int32),
           "tokens_mask": jnp.ones((1, length), jnp.int32)}
  abstract = jax.eval_shape(task.init, jax.random.key(0), dummy)
  params = {k: v for k, v in random_params(abstract, seed).items()
            if k not in task.constant_keys}
  params.update({k: v for k, v in (task.initial_values() or {}).items() if k in params})
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  save_params(workdir / "checkpoints", params, config_lib.to_json_dict(config),
              step=config.train.num_steps)
  return workdir


def override(config, **overrides):
  """Sets dotted fields: override(c, **{"model.kind": "vq", "batch_size": 8})."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def read_item(workdir: Path, item: str = "params", step: int | None = None):
  """A checkpoint item as numpy, independent of any mesh."""
  import orbax.checkpoint as ocp
  ckpt = Path(workdir) / "checkpoints"
  if step is None:
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  import jax
  path = ckpt / str(step) / item
  with ocp.StandardCheckpointer() as checkpointer:
    # A numpy target: the checkpoint may come from another topology (e.g. two processes).
    meta = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    return step, checkpointer.restore(path, target)


def steps_saved(workdir: Path) -> list[int]:
  ckpt = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def worker_env(devices: int = 1) -> dict:
  env = dict(os.environ)
  # Level 0 as in conftest: worker processes mostly compile.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def start_worker(args: list[str], devices: int = 1, log: Path | None = None) -> subprocess.Popen:
  out = open(log, "w") if log else subprocess.PIPE
  return subprocess.Popen([sys.executable, str(WORKER), *args], env=worker_env(devices),
                          stdout=out, stderr=subprocess.STDOUT, text=True)


def flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _bytes_to_unicode():
  """CLIP's byte -> printable character table (GPT-2's)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_clip_vocab(folder, pad_token="<|endoftext|>", max_length=12):
  """A small byte-level BPE vocabulary in CLIP's format, saved like an SD `tokenizer/`."""
  chars = _bytes_to_unicode()
  merges = ["r e", "re d</w>", "b l", "bl u", "blu e</w>", "c i", "ci r", "cir c", "circ l",
            "circl e</w>"]
  vocab = chars + [c + "</w>" for c in chars]
  vocab += [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  import transformers
  tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                   pad_token=pad_token, model_max_length=max_length)
  tok.save_pretrained(folder)
  return tok


def tiny_vae(config):
  """A random-init diffusers AutoencoderKL with `config`'s fields."""
  import diffusers
  import torch
  levels = len(config["block_out_channels"])
  torch.manual_seed(0)
  return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                 up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()


def sd_folder(tmp_path):
  """A tiny random-init Stable Diffusion 1.x-layout pipeline saved the diffusers way:
  (folder, the diffusers pipeline)."""
  import diffusers
  import torch
  import transformers
  tokenizer = write_clip_vocab(tmp_path / "tokenizer_src", max_length=12)
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=4)
  vae = tiny_vae(dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      latent_channels=4))
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=12, eos_token_id=tokenizer.eos_token_id,
      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.save_pretrained(tmp_path / "sd")
  return tmp_path / "sd", pipe


SDXL_UNET = dict(  # a tiny UNet2DConditionModel in SDXL's layout (see sdxl_folder)
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16)


def tiny_clip_text(tokenizer, projection_dim=None, seed=0):
  """A random-init transformers CLIPTextModel (or CLIPTextModelWithProjection with
  `projection_dim`), 32 wide, 3 layers, for `tokenizer`."""
  import torch
  import transformers
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=12, hidden_act="gelu",
      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
      pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or 512)
  if projection_dim:
    return transformers.CLIPTextModelWithProjection(config).eval()
  return transformers.CLIPTextModel(config).eval()


def sdxl_folder(tmp_path, force_zeros_for_empty_prompt=True):
  """A tiny random-init Stable Diffusion XL-layout pipeline saved the diffusers way (two
  CLIP text encoders, the second with a 16-wide projection; tokenizer_2 pads with "!", as
  SDXL's does): (folder, the diffusers pipeline)."""
  import diffusers
  import torch
  tokenizer = write_clip_vocab(tmp_path / "tokenizer_src", max_length=12)
  tokenizer_2 = write_clip_vocab(tmp_path / "tokenizer_2_src", pad_token="!", max_length=12)
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
  vae = tiny_vae(dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      latent_channels=4, scaling_factor=0.13025))
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=vae, text_encoder=tiny_clip_text(tokenizer, seed=1),
      text_encoder_2=tiny_clip_text(tokenizer_2, projection_dim=16, seed=2),
      tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=scheduler,
      force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
  pipe.save_pretrained(tmp_path / "sdxl")
  return tmp_path / "sdxl", pipe
