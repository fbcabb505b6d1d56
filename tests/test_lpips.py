"""LPIPS (jaxt2i/models/lpips.py) against a PyTorch reference at random init, its weight
loading, and the autoencoder's perceptual term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import override, random_params
from jaxt2i.models.lpips import LPIPS, load_lpips_params

torch = pytest.importorskip("torch")
import torch_lpips  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The torch model, and its weights saved as torchvision's VGG file + lpips' head file."""
  model = torch_lpips.random_lpips()
  state = model.state_dict()
  root = tmp_path_factory.mktemp("lpips")
  vgg = {k: v for k, v in state.items() if k.startswith("features.")}
  lin = {k: v for k, v in state.items() if k.startswith("lin")}
  torch.save(vgg, root / "vgg16.pth")
  torch.save(lin, root / "vgg.pth")
  return model, f"{root / 'vgg16.pth'},{root / 'vgg.pth'}", state


def test_matches_the_torch_reference(reference):
  model, paths, _ = reference
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2),
                 torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()
  params = load_lpips_params(paths)
  got = np.asarray(jax.jit(LPIPS().apply)({"params": params}, x, y))
  assert got.shape == (3,) and (got > 0).all()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  same = LPIPS().apply({"params": params}, x, x)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_lpips_package_key_names_load(reference, tmp_path):
  """An lpips.LPIPS state_dict (net.slice{k}.{i}.*, scaling_layer buffers) in one file."""
  _, paths, state = reference
  slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5,
            28: 5}
  renamed = {}
  for k, v in state.items():
    if k.startswith("features."):
      i = int(k.split(".")[1])
      renamed[f"net.slice{slices[i]}.{i}.{k.split('.')[2]}"] = v.numpy()
    elif k.startswith("lin"):
      renamed[k] = v.numpy()
  renamed["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
  np.savez(tmp_path / "lpips.npz", **renamed)
  a = load_lpips_params(str(tmp_path / "lpips.npz"))
  b = load_lpips_params(paths)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_bad_weight_files_are_named(reference, tmp_path):
  _, paths, state = reference
  vgg_only = paths.split(",")[0]
  with pytest.raises(ValueError, match=r"missing keys \[lin0\.model\.1\.weight"):
    load_lpips_params(vgg_only)
  wrong = {k: v.numpy() for k, v in state.items() if k.startswith(("features.", "lin"))}
  wrong["lin2.model.1.weight"] = np.zeros((1, 128, 1, 1), np.float32)
  np.savez(tmp_path / "wrong.npz", **wrong)
  with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight: \(1, 128, 1, 1\) "
                                       r"\(expected \(1, 256, 1, 1\)\)"):
    load_lpips_params(str(tmp_path / "wrong.npz"))
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    load_lpips_params(str(tmp_path / "nowhere.pth"))


def test_autoencoder_perceptual_term(reference):
  """The task adds perceptual_weight * LPIPS to the reconstruction loss and loads the network
  as a frozen subtree (with the GAN too: the slow autoencoder trainer test)."""
  import sys

  from helpers import REPO
  from jaxt2i.tasks.autoencoder import AutoencoderTask
  from jaxt2i.training.config import ConfigError
  sys.path.insert(0, str(REPO))
  from configs.autoencoder_shapes import get_config

  _, paths, _ = reference
  config = override(get_config("tiny"), **{"model.perceptual_weights": paths,
                                           "model.perceptual_weight": 0.5,
                                           "model.disc_weight": 0.0})
  task = AutoencoderTask(config)
  task.validate()
  assert task.frozen_keys == ("perceptual",)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  params = random_params(jax.eval_shape(task.init, jax.random.key(1), {"image": x}))
  params["perceptual"] = task.initial_values()["perceptual"]
  step = jnp.asarray(10, jnp.int32)

  def loss_fn(p):
    return task.loss(p, {"image": x}, jax.random.key(2), step)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  @jax.jit
  def direct(p):
    recon, _ = task.reconstruct(p, x, jax.random.key(2))
    return jnp.mean(LPIPS().apply({"params": p["perceptual"]}, x, recon))
  assert float(metrics["perceptual"]) == pytest.approx(float(direct(params)), rel=1e-4)
  assert np.isfinite(float(loss))
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["perceptual"]))
  assert float(jnp.abs(grads["autoencoder"]["decoder"]["conv_out"]["kernel"]).max()) > 0

  bad = override(get_config("tiny"), **{"model.perceptual_weights": "/nowhere/vgg16.pth"})
  with pytest.raises(ConfigError, match="perceptual_weights.*nowhere/vgg16.pth does not exist"):
    AutoencoderTask(bad).validate()
