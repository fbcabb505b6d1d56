"""Latent diffusion end to end at tiny sizes: frozen first stage, training, guided sampling."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (NO_FINAL_EVAL, REPO, override, random_params, random_run, read_item,
                     records, tokenizer_path, train_run)
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.eval import runner
from jaxt2i.tasks.base import get_task
from jaxt2i.training.config import ConfigError

sys.path.insert(0, str(REPO))
from configs.autoencoder_shapes import get_config as ae_config  # noqa: E402
from configs.ldm_shapes import get_config as ldm_config  # noqa: E402

# 600: the first (slow) test to use `ldm_run` also trains it (130-230 s of setup on 2 cores,
# more on a shared machine), and pytest-timeout counts fixture setup.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
  """A first stage at random weights: what the LDM reads from it is the same as from a
  trained one (trained first stages: the slow tests' `trained_ae_dir`)."""
  return random_run(ae_config("tiny"), tmp_path_factory.mktemp("ae"))


@pytest.fixture(scope="module")
def trained_ae_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained_ae")
  train_run(override(ae_config("tiny"), **{"model.disc_weight": 0.0, **NO_FINAL_EVAL}),
            workdir, source=records(64, 32))
  return workdir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.load(str(tokenizer_path(tmp_path_factory.mktemp("tok"))))


def ae_fields():
  m = ae_config("tiny").model
  return {k: m[k] for k in ("kind", "latent_channels", "block_out_channels", "layers_per_block",
                            "norm_groups", "mid_attention", "num_codes", "vq_beta",
                            "vq_l2_normalize")}


def tiny_ldm(ae_dir, tok, **overrides):
  return override(ldm_config("tiny"), **{
      "model.autoencoder_workdir": str(ae_dir), "data.tokenizer": tok.path,
      "data.max_caption_length": 20, **overrides})


def test_needs_a_first_stage():
  config = ldm_config("tiny")
  with pytest.raises(ConfigError, match="autoencoder_workdir is empty"):
    get_task(config)


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, trained_ae_dir, tok):
  workdir = tmp_path_factory.mktemp("ldm")
  trainer, state = train_run(tiny_ldm(trained_ae_dir, tok, **NO_FINAL_EVAL), workdir,
                             source=records(64, 32), tokenizer=tok)
  return workdir, trainer, state


def test_loss_trains_the_unet_and_text_encoder_and_not_the_first_stage(ae_dir, tok):
  """The training loss on random weights (the fast suite's LDM step; whole runs are slow
  tests): finite, and its gradients reach every U-Net and text-encoder weight and no
  first-stage weight."""
  config = tiny_ldm(ae_dir, tok, **{"model.latent_scale": 0.7})
  task = get_task(config)
  scenes = records(8, 32)
  tokens, mask = tok.encode([r["caption"] for r in scenes], 20)
  batch = {"image": jnp.asarray(np.stack([r["image"] for r in scenes]) / 127.5 - 1.0,
                                jnp.float32),
           "tokens": jnp.asarray(tokens, jnp.int32), "tokens_mask": jnp.asarray(mask, jnp.int32)}
  params = random_params(jax.eval_shape(task.init, jax.random.key(0), batch))
  params["autoencoder"] = task.initial_values()["autoencoder"]
  (loss, aux), grads = jax.jit(jax.value_and_grad(
      lambda p: task.loss(p, batch, jax.random.key(1)), has_aux=True))(params)
  assert np.isfinite(loss) and set(aux) == {"mse", "latent_std"}
  assert task.frozen_keys == ("autoencoder",)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name, g = jax.tree_util.keystr(path), np.asarray(g)
    assert np.isfinite(g).all(), name
    if name.startswith("['autoencoder']"):
      assert not g.any(), f"the frozen first stage gets a gradient at {name}"
    else:
      assert g.any(), f"no gradient reaches {name}"


@pytest.mark.slow  # ~2 min on 2 cores, mostly compiling the U-Net, autoencoder and sampler
def test_trains_with_the_first_stage_frozen(ldm_run, trained_ae_dir, tok):
  tmp_path, trainer, state = ldm_run
  ae_dir = trained_ae_dir
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["latent_scale"] > 0
  assert saved["model"]["autoencoder"]["latent_channels"] == 4
  ae_params = read_item(ae_dir, "params")[1]["autoencoder"]
  ldm_params = read_item(tmp_path, "params")[1]
  flat_ae, flat_ldm = (jax.tree_util.tree_leaves_with_path(t) for t in (
      ae_params, ldm_params["autoencoder"]))
  for (path, a), (_, b) in zip(flat_ae, flat_ldm):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(l["train/loss"]) for l in lines if "train/loss" in l)

  # Sampling: uint8 images, the same seed gives the same images.
  task = trainer.task
  params = jax.device_get(state.ema_params)
  captions = [r["caption"] for r in records(4, 32)]
  a = runner.generate_images(task, params, tok, captions, seed=3)
  b = runner.generate_images(task, params, tok, captions, seed=3)
  c = runner.generate_images(task, params, tok, captions, seed=4)
  assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sampling_arguments_do_not_recompile(tok):
  # The first stage's fields alone (random weights): no autoencoder run needed.
  config = tiny_ldm("", tok, **{"model.latent_scale": 1.0})
  config.model.autoencoder = ae_fields()
  task = get_task(config)
  size = task.config.data.image_size
  batch = {"image": jnp.zeros((1, size, size, 3)), "tokens": jnp.zeros((1, 20), jnp.int32),
           "tokens_mask": jnp.ones((1, 20), jnp.int32)}
  params = random_params(jax.eval_shape(task.init, jax.random.key(0), batch))
  traces = []

  @jax.jit
  def generate(params, tokens, mask, rng, scale, steps):
    traces.append(1)
    return task.generate(params, tokens, mask, rng, guidance_scale=scale, num_steps=steps)

  tokens, mask = tok.encode(["a small red circle in the center"] * 2, 20)
  for seed, scale, steps in ((0, 5.0, 3), (1, 2.0, 5), (2, 1.0, 2)):
    out = generate(params, tokens, mask, jax.random.key(seed), scale, steps)
    assert out.shape == (2, size, size, 3)
  assert len(traces) == 1


@pytest.mark.slow  # ~2 min on 2 cores
@pytest.mark.timeout(300)
def test_tiny_ldm_overfits_four_images(tmp_path, trained_ae_dir, tok):
  """The denoising loss on 4 captioned images falls well below its starting value."""
  four = records(4, 32)
  config = tiny_ldm(trained_ae_dir, tok, **{
      "train.num_steps": 300, "batch_size": 4, "train.log_every": 25,
      "optim.learning_rate": 2e-3, "optim.warmup_steps": 20, "model.caption_dropout": 0.0,
      "checkpoint.every_steps": 1000, "train.ema_decay": 0.0})
  train_run(config, tmp_path, source=list(four) * 2, tokenizer=tok)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_pipeline_on_a_latent_diffusion_run(ldm_run):
  import jaxt2i
  workdir, trainer, _ = ldm_run
  pipe = jaxt2i.load(workdir)
  prompt = "a small red circle in the center"
  a = pipe([prompt], num_images_per_prompt=2, seed=0, steps=3, output="np")
  b = pipe([prompt], num_images_per_prompt=2, seed=0, steps=3, output="np")
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[0], a[1])  # two samples of one prompt differ
  # Seeds, guidance, steps, eta and negative prompts are traced: still one compilation.
  pipe([prompt], num_images_per_prompt=2, seed=5, steps=4, guidance_scale=2.0, eta=0.5,
       negative_prompt="a large blue square at the bottom", output="np")
  assert pipe.num_compilations == 1
  # The initial noise can be given, NHWC like diffusers' `latents`.
  shape = (2,) + trainer.task.latent_shape()
  noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  c = pipe([prompt], num_images_per_prompt=2, latents=noise, steps=3, output="np")
  d = pipe([prompt], num_images_per_prompt=2, latents=noise, seed=9, steps=3, output="np")
  np.testing.assert_array_equal(c, d)  # DDIM with eta 0: the latents decide everything
  with pytest.raises(ValueError, match="latents has 3 rows"):
    pipe([prompt], num_images_per_prompt=2, latents=np.zeros((3,) + shape[1:]), steps=3)


def test_convert_to_diffusers(ae_dir, tok, tmp_path, capsys):
  """`jaxt2i convert to-diffusers` on a run (random weights in a trained run's layout):
  diffusers loads the U-Net and the autoencoder and computes what jaxt2i does (the
  sentencepiece text encoder stays behind)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from jaxt2i import main
  from jaxt2i.eval.runner import load_run
  workdir = random_run(tiny_ldm(ae_dir, tok, **{"model.latent_scale": 0.7}), tmp_path / "run")
  main.run(["convert", "to-diffusers", str(workdir), str(tmp_path / "out")])
  assert json.loads(capsys.readouterr().out)["parts"] == ["unet", "vae", "scheduler"]
  config, task, params = load_run(workdir)
  unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
  vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").eval()
  assert vae.config.scaling_factor == pytest.approx(config.model.latent_scale)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2,) + task.latent_shape()).astype(np.float32)
  context = rng.standard_normal((2, 5, task.text_width)).astype(np.float32)
  t = np.array([10, 700])
  ours = jax.jit(task.unet.apply)({"params": params["unet"]}, latents, t, context)
  with torch.no_grad():
    theirs = unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max())
  with torch.no_grad():
    theirs = vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy()
  ours = jax.jit(functools.partial(task.autoencoder.apply, method="decode"))(
      {"params": params["autoencoder"]}, latents)
  np.testing.assert_allclose(np.asarray(ours), theirs.transpose(0, 2, 3, 1),
                             atol=1e-4 * np.abs(theirs).max())
  # A U-Net with coordinates appended to its input has no diffusers counterpart.
  from jaxt2i.convert.to_diffusers import save_diffusers
  with config.unlocked():
    config.model.position_channels = True
  with pytest.raises(ValueError, match="position_channels"):
    save_diffusers(config, type(task)(config), params, tmp_path / "coords")


@pytest.mark.slow  # ~2 min on 2 cores: compiling the ControlNet step and the sampler
def test_controlnet_training_beside_a_trained_run(ldm_run, tmp_path, tok):
  """configs/controlnet_shapes.py: the ControlNet starts as the base U-Net's encoder with zero
  convolutions and is the only trained (and checkpointed) weight; sampling with a control
  image (derived like the training ones) changes the images, without one gives the base's."""
  import jaxt2i
  from configs.controlnet_shapes import get_config
  from jaxt2i.tasks.ldm import CONTROL_IMAGES
  base, _, _ = ldm_run
  config = override(get_config(f"{base},tiny"), **{"data.tokenizer": tok.path,
                                                    "optim.learning_rate": 1e-2,
                                                    "optim.warmup_steps": 0})
  task = get_task(config)
  assert task.constant_keys == ("unet", "text_encoder", "autoencoder")
  start = task.initial_values()["controlnet_0"]
  base_unet = read_item(base, "ema_params")[1]["unet"]
  np.testing.assert_array_equal(start["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
                                base_unet["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])
  assert not np.any(start["controlnet_mid_block"]["kernel"])  # a zero convolution
  _, state = train_run(config, tmp_path / "run", source=records(64, 32), tokenizer=tok)
  assert set(state.params) == {"controlnet_0"}
  saved = read_item(tmp_path / "run", "params")[1]
  assert set(saved) == {"controlnet_0"} and np.any(saved["controlnet_0"]["controlnet_mid_block"]
                                                   ["kernel"])

  pipe = jaxt2i.load(tmp_path / "run", compilation_cache=False)
  base_pipe = jaxt2i.load(base, compilation_cache=False)
  images = np.stack([r["image"] for r in records(2, 32)]).astype(np.float32) / 255.0
  control = np.asarray(CONTROL_IMAGES["mask"](images))
  assert set(np.unique(control)) <= {0.0, 1.0} and control.shape == (2, 32, 32, 3)
  prompts = ["a red circle", "a blue square"]
  plain = pipe(prompts, steps=3, seed=0, output="np")
  np.testing.assert_array_equal(plain, base_pipe(prompts, steps=3, seed=0, output="np"))
  controlled = pipe(prompts, steps=3, seed=0, output="np", control_image=control)
  assert np.abs(controlled.astype(int) - plain.astype(int)).max() > 0
  with pytest.raises(ConfigError, match="control_image='canny'"):
    get_task(override(config, **{"model.control_image": "canny"}))
