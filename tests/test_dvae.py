"""The DALL-E discrete VAE: parity with OpenAI's `dall_e`, conversion, losses, training."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, override, records, train_run
from jaxt2i.models import dvae
from jaxt2i.parallel import partitioning
from jaxt2i.tasks.dvae import (DiscreteVAETask, codebook_usage, gumbel_temperature,
                               kl_weight_at)
from jaxt2i.training.config import ConfigError

sys.path.insert(0, str(REPO))
from configs.dvae_shapes import get_config  # noqa: E402


def tiny(**overrides):
  return override(get_config("tiny"), **overrides)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def random_params(init, *args, seed: int = 0):
  """Params of `init`'s shapes drawn with numpy (kernels ~ N(0, 1/fan_in), biases N(0, 0.1)):
  compiling the model's own initializers costs ~15 s per model on XLA:CPU."""
  shapes = partitioning.unbox(jax.eval_shape(init, jax.random.key(0), *args))["params"]
  rng = np.random.RandomState(seed)

  def draw(s):
    scale = 1 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
    return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)
  return jax.tree.map(draw, shapes)


@pytest.fixture(scope="module")
def reference():
  """A tiny random `dall_e` Encoder / Decoder pair (their validators want production sizes),
  with nonzero biases so the conversion of every tensor is checked."""
  attr = pytest.importorskip("attr")
  torch = pytest.importorskip("torch")
  dall_e = pytest.importorskip("dall_e")
  torch.manual_seed(0)
  with attr.validators.disabled():
    enc = dall_e.Encoder(n_hid=16, n_blk_per_group=1, vocab_size=64)
    dec = dall_e.Decoder(n_init=16, n_hid=16, n_blk_per_group=1, vocab_size=64)
  with torch.no_grad():
    for p in [*enc.parameters(), *dec.parameters()]:
      if p.ndim == 1:
        p.normal_(std=0.1)
  return enc.float().eval(), dec.float().eval()


def torch_outputs(reference, images01, tokens):
  """The `dall_e` reference's logits and decoder stats, NHWC numpy."""
  import torch
  from dall_e import map_pixels
  enc, dec = reference
  with torch.no_grad():
    x = map_pixels(torch.from_numpy(np.asarray(images01)).permute(0, 3, 1, 2).contiguous())
    logits = enc(x).permute(0, 2, 3, 1).numpy()
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(np.array(tokens)).long(), 64)
    stats = dec(one_hot.permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1).numpy()
  return logits, stats


def test_parity_with_dall_e(reference):
  from jaxt2i.convert.dall_e import dvae_fields_from_dall_e, dvae_params_from_dall_e
  enc, dec = reference
  fields = dvae_fields_from_dall_e(enc.state_dict(), dec.state_dict())
  assert fields == {"vocab_size": 64, "hidden": 16, "init_width": 16, "blocks_per_group": 1,
                    "downsample_factor": 8, "channels": 3}
  model = dvae.DiscreteVAE(**fields)
  params = dvae_params_from_dall_e(enc.state_dict(), dec.state_dict(), model)
  images = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
  tokens = np.random.RandomState(1).randint(0, 64, (2, 4, 4)).astype(np.int32)
  want_logits, want_stats = torch_outputs(reference, images, tokens)
  logits = model.apply({"params": params}, images, method="encode_logits")
  assert logits.shape == (2, 4, 4, 64)
  assert rel_err(logits, want_logits) <= 1e-4
  # Tokens take a row of the input conv, one-hot codes multiply it: both are the reference.
  for codes in (tokens, jax.nn.one_hot(tokens, 64)):
    stats = model.apply({"params": params}, codes, method="decode_stats")
    assert stats.shape == (2, 32, 32, 6)
    assert rel_err(stats, want_stats) <= 1e-4
  np.testing.assert_array_equal(model.apply({"params": params}, images, method="encode"),
                                want_logits.argmax(-1))


def test_converter_names_bad_state_dicts(reference):
  from jaxt2i.convert.dall_e import dvae_fields_from_dall_e, dvae_params_from_dall_e
  enc, dec = reference
  es, ds = enc.state_dict(), dec.state_dict()
  with pytest.raises(ValueError, match="vocab_size: encoder 64, decoder 32"):
    dvae_fields_from_dall_e(es, {**ds, "blocks.input.w": ds["blocks.input.w"][:, :32]})
  with pytest.raises(ValueError, match="not a dall_e Decoder"):
    dvae_fields_from_dall_e(es, {"w": ds["blocks.input.w"]})
  model = dvae.DiscreteVAE(**dvae_fields_from_dall_e(es, ds))
  broken = {k: v for k, v in es.items() if "conv_2" not in k}
  with pytest.raises(ValueError, match=r"encoder state_dict .* missing keys .*res_path\.conv_2"):
    dvae_params_from_dall_e(broken, ds, model)


def test_convert_cli_round_trip(reference, tmp_path):
  """`jaxt2i convert dall-e-dvae` on torch.save'd modules writes a run `load_run` reads back;
  the task's encode_tokens / decode_tokens give the reference's tokens and images."""
  import torch
  from jaxt2i.eval.runner import load_run
  from jaxt2i.main import run
  enc, dec = reference
  torch.save(enc, tmp_path / "encoder.pkl")
  torch.save(dec, tmp_path / "decoder.pkl")
  out = tmp_path / "dvae_run"
  args = ["convert", "dall-e-dvae", "--encoder", str(tmp_path / "encoder.pkl"),
          "--decoder", str(tmp_path / "decoder.pkl"), "--out", str(out), "--image_size", "32"]
  run(args)
  config, task, params = load_run(out)
  assert config.task == "dvae" and config.model.vocab_size == 64
  assert config.model.downsample_factor == 8 and config.data.image_size == 32

  images01 = np.random.RandomState(2).rand(2, 32, 32, 3).astype(np.float32)
  low, high = config.data.value_range
  tokens = jax.jit(task.encode_tokens)(params, jnp.asarray(images01 * (high - low) + low))
  want_logits, want_stats = torch_outputs(reference, images01, np.asarray(tokens))
  assert tokens.dtype == jnp.int32 and tokens.shape == (2, 4, 4)
  np.testing.assert_array_equal(tokens, want_logits.argmax(-1))
  decoded = jax.jit(task.decode_tokens)(params, tokens)
  want = dvae.stats_to_pixels(want_stats) * (high - low) + low
  np.testing.assert_allclose(decoded, want, atol=1e-4)

  with pytest.raises(SystemExit, match="already holds a run"):
    run(args)
  with pytest.raises(SystemExit, match="encoder not found at"):
    run(["convert", "dall-e-dvae", "--encoder", str(tmp_path / "nope.pkl"), "--decoder",
         str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "other")])


def test_map_unmap_pixels_are_inverse():
  x = np.linspace(0, 1, 101, dtype=np.float32)
  mapped = dvae.map_pixels(x)
  assert float(mapped.min()) == pytest.approx(0.1) and float(mapped.max()) == pytest.approx(0.9)
  np.testing.assert_allclose(dvae.unmap_pixels(mapped), x, atol=1e-6)
  assert float(dvae.unmap_pixels(jnp.float32(0.95))) == 1.0  # clipped to [0, 1]


def test_logit_laplace_nll_is_the_papers_density():
  rng = np.random.RandomState(0)
  x = rng.uniform(0.1, 0.9, (4, 3)).astype(np.float32)
  mu = rng.normal(size=(4, 3)).astype(np.float32)
  log_b = rng.uniform(-2, 1, (4, 3)).astype(np.float32)
  got = dvae.logit_laplace_nll(x, np.concatenate([mu, log_b], -1))
  xd, b = x.astype(np.float64), np.exp(log_b.astype(np.float64))
  density = np.exp(-np.abs(np.log(xd / (1 - xd)) - mu) / b) / (2 * b * xd * (1 - xd))
  np.testing.assert_allclose(got, -np.log(density), rtol=1e-5, atol=1e-5)
  # A density on (0, 1): it integrates to one (midpoint rule on a fine grid).
  grid = (np.arange(200_000) + 0.5) / 200_000
  stats = np.broadcast_to(np.float32([0.3, math.log(0.5)]), (grid.size, 2))
  mass = np.exp(-np.asarray(dvae.logit_laplace_nll(grid[:, None].astype(np.float32), stats),
                            np.float64)).mean()
  assert mass == pytest.approx(1.0, abs=1e-3)


def test_kl_to_uniform():
  np.testing.assert_allclose(dvae.kl_to_uniform(jnp.zeros((2, 3, 3, 16))), 0.0, atol=1e-6)
  np.testing.assert_allclose(dvae.kl_to_uniform(jnp.full((1, 2, 2, 8), 3.7)), 0.0, atol=1e-6)
  # A (nearly) one-hot posterior is log K from uniform at each of the 4 positions.
  peaked = jnp.zeros((1, 2, 2, 8)).at[..., 0].set(50.0)
  assert float(dvae.kl_to_uniform(peaked)[0]) == pytest.approx(4 * math.log(8), rel=1e-5)


def test_gumbel_softmax_is_a_relaxed_one_hot():
  logits = jnp.log(jnp.array([0.7, 0.2, 0.1]))
  cold = dvae.gumbel_softmax(jax.random.key(0), jnp.broadcast_to(logits, (20000, 3)), 0.05)
  np.testing.assert_allclose(cold.sum(-1), 1.0, atol=1e-5)
  assert float(cold.max(-1).mean()) > 0.95  # near one-hot at low temperature
  # Its argmax is a sample of softmax(logits).
  np.testing.assert_allclose(np.bincount(np.asarray(cold.argmax(-1)), minlength=3) / 20000,
                             [0.7, 0.2, 0.1], atol=0.015)


@pytest.mark.parametrize("factor", [4, 8])
def test_shapes_and_finite(factor):
  model = dvae.DiscreteVAE(vocab_size=32, hidden=8, init_width=8, blocks_per_group=1,
                           downsample_factor=factor)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  params = random_params(model.init, x)
  assert len([k for k in params["encoder"] if k.startswith("group_")]) == math.log2(factor) + 1

  @jax.jit
  def run(params):
    stats, logits = model.apply({"params": params}, x, jax.random.key(2), 0.5)
    tokens = model.apply({"params": params}, x, method="encode")
    return stats, logits, tokens, model.apply({"params": params}, tokens, method="decode")
  stats, logits, tokens, images = run(params)
  side = 32 // factor
  assert logits.shape == (2, side, side, 32) and stats.shape == (2, 32, 32, 6)
  assert tokens.shape == (2, side, side) and tokens.dtype == jnp.int32
  assert images.shape == (2, 32, 32, 3)
  for a in (stats, logits, images):
    assert np.isfinite(np.asarray(a)).all()
  assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_schedules_and_codebook_usage():
  for schedule in ("cosine", "exponential"):
    temps = [float(gumbel_temperature(s, 1.0, 1 / 16, 100, schedule)) for s in (0, 50, 100, 500)]
    assert temps[0] == pytest.approx(1.0) and temps[2] == temps[3] == pytest.approx(1 / 16)
    assert temps[0] > temps[1] > temps[2]
  assert float(gumbel_temperature(50, 1.0, 1 / 16, 100, "exponential")) == pytest.approx(0.25)
  assert [float(kl_weight_at(s, 6.6, 10)) for s in (0, 5, 10, 20)] == pytest.approx(
      [0.0, 3.3, 6.6, 6.6])
  every = codebook_usage(jnp.arange(16).reshape(1, 4, 4), 16)
  assert float(every["perplexity"]) == pytest.approx(16.0) and float(every["dead_codes"]) == 0
  one = codebook_usage(jnp.full((2, 4, 4), 3), 16)
  assert float(one["perplexity"]) == pytest.approx(1.0)
  assert float(one["dead_codes"]) == pytest.approx(15 / 16)


def test_gradients_reach_every_parameter():
  task = DiscreteVAETask(tiny(**{"model.reconstruction": "logit_laplace"}))
  task.validate()
  batch = {"image": jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)}
  params = random_params(lambda rng, b: {"params": task.init(rng, b)}, batch)
  grads, metrics = jax.jit(jax.grad(
      lambda p: task.loss(p, batch, jax.random.key(2), step=jnp.int32(5)), has_aux=True))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  assert float(metrics["kl_weight"]) == pytest.approx(0.5 * task.config.model.kl_weight)
  assert float(metrics["rec_loss"]) == pytest.approx(float(metrics["nll"]), rel=1e-5)


def test_codebook_restart_splits_the_worst_positions_off_their_codes():
  """At a restart step, dead codes take their donors' decoder rows and win the seed positions
  (the worst-reconstructed ones) by the margin; between restarts nothing moves but the usage
  EMA."""
  from jaxt2i.tasks import dvae as dvae_task
  from jaxt2i.training.trainer import _replace_leaves
  task = DiscreteVAETask(tiny(**{"model.restart_every": 10, "model.restart_count": 4}))
  task.validate()
  assert task.frozen_keys == ("code_usage",)
  batch = {"image": jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)}
  params = random_params(lambda rng, b: {"params": task.init(rng, b)}, batch)
  params["code_usage"] = jnp.zeros_like(params["code_usage"])
  loss = jax.jit(lambda p, s: task.loss(p, batch, jax.random.key(2), step=s)[1])
  between, at = loss(params, jnp.int32(5)), loss(params, jnp.int32(10))
  assert int(between["restarted"]) == 0
  for leaf in jax.tree.leaves(between["state_deltas"]):
    assert not np.asarray(leaf).any()
  assert int(at["restarted"]) == 4

  x01 = task._to_unit(batch["image"])
  tokens = np.asarray(task.encode_tokens(params, batch["image"])).reshape(-1)
  counts = np.bincount(tokens, minlength=64)
  usage = np.asarray(at["state_updates"]["code_usage"])
  restarted = np.flatnonzero(usage == dvae_task.RESTART_USAGE)
  assert len(restarted) == 4 and not counts[restarted].any()  # codes unused in the batch
  new = _replace_leaves(params, at["state_deltas"], add=True)  # as the trainer applies them
  new_tokens = np.asarray(task.encode_tokens(new, batch["image"])).reshape(-1)
  # Each restarted code now wins positions (its donor's seed), and only they take positions;
  # each took a distinct used code's decoder row.
  changed = new_tokens != tokens
  assert set(new_tokens[changed]) <= set(restarted) and set(restarted) <= set(new_tokens)
  dec_old = np.asarray(params["dvae"]["decoder"]["input"]["kernel"][0, 0])
  dec_new = np.asarray(new["dvae"]["decoder"]["input"]["kernel"][0, 0])
  donors = [np.flatnonzero(np.isclose(dec_old, dec_new[j], atol=1e-6).all(-1))
            for j in restarted]
  assert all(len(d) == 1 and counts[d[0]] > 1 for d in donors)
  assert len({int(d[0]) for d in donors}) == 4
  # The seeds are the positions whose argmax-token patch reconstruction is worst.
  # No logit moved by more than the margin over its donor's, anywhere in the batch.
  logits = [task.model.apply({"params": p["dvae"]}, x01, method="encode_logits")
            for p in (params, new)]
  lead = np.asarray(logits[1].max(-1) - logits[0].max(-1))
  assert lead.max() <= task.config.model.restart_margin + 1e-4
  recon = task.model.apply({"params": params["dvae"]}, jnp.asarray(tokens.reshape(2, 8, 8)),
                           method="decode")
  err = np.square(np.asarray(recon - x01)).reshape(2, 8, 4, 8, 4, 3).sum((2, 4, 5))
  assert changed[np.argmax(err)]
  # Outside [restart_start, restart_until) a restart step restarts nothing.
  for window in ({"model.restart_start": 20}, {"model.restart_until": 10}):
    late = DiscreteVAETask(tiny(**{"model.restart_every": 10, **window}))
    out = jax.jit(lambda p: late.loss(p, batch, jax.random.key(2), step=jnp.int32(10))[1])(
        params)
    assert int(out["restarted"]) == 0
  with pytest.raises(ConfigError, match="restart_every=10 needs train.grad_accum_steps=1"):
    DiscreteVAETask(tiny(**{"model.restart_every": 10, "train.grad_accum_steps": 2})).validate()


def test_mse_option_is_the_pixel_squared_error():
  task = DiscreteVAETask(tiny(**{"model.reconstruction": "mse"}))
  task.validate()
  rng = np.random.RandomState(0)
  x01 = rng.rand(2, 4, 4, 3).astype(np.float32)
  stats = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
  per_image, metrics = task._reconstruction(x01, stats)
  mean = (1 / (1 + np.exp(-stats[..., :3])) - 0.1) / 0.8  # unmapped, unclipped decoder mean
  np.testing.assert_allclose(per_image, ((mean - x01) ** 2).sum((1, 2, 3)), rtol=1e-5)
  assert float(metrics["mse"]) == pytest.approx(float(((mean - x01) ** 2).mean()), rel=1e-5)


def test_bad_configs_are_named():
  with pytest.raises(ConfigError, match=r"config\.model\.downsample_factor=6: must be a power"):
    DiscreteVAETask(tiny(**{"model.downsample_factor": 6})).validate()
  with pytest.raises(ConfigError, match=r"config\.model\.vocab_size=1"):
    DiscreteVAETask(tiny(**{"model.vocab_size": 1})).validate()
  with pytest.raises(ConfigError, match=r"config\.model\.hidden=18: must be a positive multiple"):
    DiscreteVAETask(tiny(**{"model.hidden": 18})).validate()
  with pytest.raises(ConfigError, match=r"image_size=36 is not divisible by config\.model\."
                     "downsample_factor=8"):
    DiscreteVAETask(tiny(**{"model.downsample_factor": 8, "data.image_size": 36})).validate()
  with pytest.raises(ConfigError, match="model.reconstruction='l1'"):
    DiscreteVAETask(tiny(**{"model.reconstruction": "l1"})).validate()
  with pytest.raises(ConfigError, match="temperature_end=0"):
    DiscreteVAETask(tiny(**{"model.temperature_end": 0.0})).validate()
  with pytest.raises(ValueError, match="unknown dVAE variant 'huge'"):
    dvae.variant("huge")
  assert dvae.variant("tiny", vocab_size=16).vocab_size == 16
  # The model itself, used without a config, says the same.
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="downsample_factor=3"):
    dvae.DiscreteVAE(downsample_factor=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
    dvae.DiscreteVAE(vocab_size=8, hidden=8, init_width=8).init(jax.random.key(0),
                                                                jnp.zeros((1, 20, 20, 3)))


@pytest.mark.slow  # ~1 min; tests/test_dalle.py trains the tiny dVAE with the trainer too
def test_trains_with_the_trainer(tmp_path):
  """30 steps of the tiny recipe (f = 2: two groups compile faster): the loss falls; the run
  writes its eval."""
  config = tiny(**{"train.num_steps": 30, "train.log_every": 10, "optim.learning_rate": 2e-3,
                   "model.downsample_factor": 2, "optim.warmup_steps": 5})
  train_run(config, tmp_path, source=records(64, 32))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  assert len(train) == 3 and all(np.isfinite(l["train/loss"]) for l in train)
  assert train[-1]["train/loss"] < 0.5 * train[0]["train/loss"]
  assert train[-1]["train/temperature"] < train[0]["train/temperature"]
  assert train[-1]["train/kl_weight"] == pytest.approx(config.model.kl_weight)
  evals = [l for l in lines if "eval/psnr" in l]
  assert evals and 1.0 <= evals[-1]["eval/perplexity"] <= 64
  assert (tmp_path / "samples").exists()
