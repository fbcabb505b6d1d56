"""KL / VQ autoencoders and their GAN training task."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, override, random_params, records
from jaxt2i.models.autoencoder import Autoencoder, kl_divergence
from jaxt2i.tasks.autoencoder import AutoencoderTask
from jaxt2i.training.trainer import Trainer

sys.path.insert(0, str(REPO))
from configs.autoencoder_shapes import get_config  # noqa: E402


def tiny(**overrides):
  return override(get_config("tiny"), **overrides)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_shapes_and_finite(kind):
  ae = Autoencoder(kind=kind, latent_channels=3, block_out_channels=(16, 32, 32),
                   layers_per_block=1, groups=8, num_codes=32)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  params = random_params(jax.eval_shape(ae.init, jax.random.key(1), x)["params"])
  apply = jax.jit(ae.apply, static_argnames="method")
  recon, post = apply({"params": params}, x, jax.random.key(2))
  assert recon.shape == x.shape and np.isfinite(np.asarray(recon)).all()
  assert post["latents"].shape == (2, 8, 8, 3)  # f = 4
  decoded = apply({"params": params}, post["latents"], method="decode")
  np.testing.assert_allclose(decoded, recon, atol=1e-5)
  if kind == "kl":
    # Without an rng the posterior mean is decoded: deterministic.
    a, _ = apply({"params": params}, x)
    b, _ = apply({"params": params}, x)
    np.testing.assert_array_equal(a, b)
  else:
    assert post["indices"].shape == (2, 8, 8)


def test_kl_divergence_formula():
  mean = jnp.array([[0.5, -1.0]])
  logvar = jnp.array([[0.0, jnp.log(2.0)]])
  expected = 0.5 * ((0.25 + 1 - 1 - 0) + (1 + 2 - 1 - np.log(2.0)))
  assert float(kl_divergence(mean, logvar)[0]) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def gan_task():
  """One tiny KL task with the GAN switching on at step 10 (disc_weight 1), compiled once."""
  task = AutoencoderTask(tiny(**{"model.disc_start": 10, "model.disc_weight": 1.0}))
  task.validate()
  batch = {"image": jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1,
                                       maxval=1)}
  params = random_params(jax.eval_shape(task.init, jax.random.key(1), batch))
  return task, params, batch


def test_gradients_reach_both_halves_only_when_the_gan_is_on(gan_task):
  task, params, batch = gan_task
  grad = jax.jit(jax.grad(lambda p, s: task.loss(p, batch, jax.random.key(3), step=s)[0]))
  before, after = grad(params, jnp.int32(9)), grad(params, jnp.int32(10))
  for path, g in jax.tree_util.tree_flatten_with_path(after)[0]:
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(before["discriminator"]))


def test_adaptive_weight_uses_the_decoder_last_layer_gradients(gan_task):
  task, params, batch = gan_task
  rng = jax.random.key(3)
  metrics = jax.jit(lambda p: task.loss(p, batch, rng, step=jnp.int32(10))[1])(params)
  assert float(metrics["disc_on"]) == 1.0

  def term(which):
    def f(p):
      recon, _ = task.model.apply({"params": p["autoencoder"]}, batch["image"], rng)
      if which == "rec":
        return jnp.mean(jnp.abs(batch["image"] - recon))
      return -jnp.mean(task.discriminator.apply({"params": p["discriminator"]}, recon))
    g = jax.jit(jax.grad(f))(params)["autoencoder"]["decoder"]["conv_out"]["kernel"]
    return jnp.linalg.norm(g)
  expected = term("rec") / (term("gan") + 1e-4)
  assert float(metrics["d_weight"]) == pytest.approx(float(expected), rel=1e-4)


def test_bad_configs_are_named():
  from jaxt2i.training.config import ConfigError
  with pytest.raises(ConfigError, match="model.kind"):
    AutoencoderTask(tiny(**{"model.kind": "vae"})).validate()
  with pytest.raises(ConfigError, match="divisible by the downsampling factor 4"):
    AutoencoderTask(tiny(**{"model.block_out_channels": (16, 16, 16),
                            "data.image_size": 30})).validate()
  with pytest.raises(ConfigError, match="perceptual_weights"):
    AutoencoderTask(tiny(**{"model.perceptual_weights": "/lpips.pth"})).validate()


@pytest.mark.slow  # ~25 s each on 2 cores
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["kl", "vq", "vq_ema"])
def test_trains_with_the_trainer(tmp_path, kind):
  """Reconstruction improves over 60 steps with the GAN switched on half way."""
  ema = 0.9 if kind == "vq_ema" else 0.0
  config = tiny(**{"model.kind": kind[:2], "model.num_codes": 64, "train.num_steps": 60,
                   "model.vq_ema_decay": ema,
                   "model.disc_start": 30, "optim.learning_rate": 2e-3,
                   "train.log_every": 10, "optim.warmup_steps": 5})
  trainer = Trainer(config, tmp_path, source=records(64, 32), devices=jax.devices()[:1])
  try:
    state = trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  if ema:  # the statistics moved: N tends to the 8 x 16 x 16 latents assigned per step
    sizes = np.asarray(state.params["autoencoder"]["quantizer"]["ema_cluster_size"])
    assert sizes.sum() == pytest.approx(8 * 16 * 16, rel=0.01) and sizes.std() > 0
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/l1" in l]
  assert train[-1]["train/l1"] < 0.7 * train[0]["train/l1"]
  assert train[-1]["train/disc_on"] == 1.0 and train[0]["train/disc_on"] == 0.0
  assert all(np.isfinite(l["train/loss"]) for l in train)
  evals = [l for l in lines if "eval/psnr" in l]
  assert evals and evals[-1]["eval/psnr"] > 10
  assert (tmp_path / "samples").exists()
