"""FID Inception-v3 (jaxt2i/eval/inception.py) against a PyTorch reference at random init.

The reference (tests/torch_fid_inception.py) has the key layout of pytorch-fid's
pt_inception-2015-12-05 weights, so the same loader path that reads the real file is tested.
BatchNorm statistics are calibrated on data (so activations neither vanish nor explode over 94
conv layers) and then perturbed, so every BN is a non-trivial affine map.
"""

import jax
import numpy as np
import pytest

from jaxt2i.eval import inception

try:
  import torch
  import torch.nn.functional as F
  import torch_fid_inception as tfi
except ImportError:  # The loader tests still run; the parity tests need the [torch] extra.
  torch = F = tfi = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch reference not installed")
TOL = 1e-4  # max |flax - torch| / max |torch|, float32 throughout.


def rel_err(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def random_state(seed=0):
  """A numpy state_dict in the FID file's layout, without torch (plus an ignored counter)."""
  rng = np.random.default_rng(seed)
  state = {k: rng.standard_normal(shape, dtype=np.float32)
           for k, (_, _, shape) in inception._expected_layout().items()}
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(1, np.int64)
  return state


def random_reference():
  """An eval-mode reference whose BatchNorms really normalise, shift and scale."""
  torch.manual_seed(0)
  model = tfi.FIDInception3()
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.momentum = 1.0  # One train-mode pass stores that batch's statistics.
    model.train()
    model(torch.rand(4, 3, 299, 299) * 2 - 1)
    for bn in bns:
      c = bn.num_features
      bn.running_mean += 0.2 * torch.randn(c) * bn.running_var.sqrt()
      bn.running_var *= torch.empty(c).uniform_(0.5, 2.0)
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
  return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, path of its state_dict saved with torch.save, loaded Flax variables)."""
  model = random_reference()
  path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
  torch.save(model.state_dict(), path)
  return model, path, inception.load_fid_inception(path)


@needs_torch
def test_network_matches_torch(reference):
  model, _, variables = reference
  torch.manual_seed(1)
  x = torch.rand(2, 3, 299, 299) * 2 - 1
  with torch.no_grad():
    pool, logits = model(x)
  out = inception.inception_outputs(variables, x.permute(0, 2, 3, 1).numpy())
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert float(pool.std()) > 0.1  # Features have not collapsed, so the comparison means something.
  assert rel_err(out["pool"], pool) <= TOL, rel_err(out["pool"], pool)
  assert rel_err(out["logits"], logits) <= TOL, rel_err(out["logits"], logits)


@needs_torch
def test_fid_features_end_to_end(reference):
  """uint8 64x64 images -> /255 -> bilinear 299 -> 2x - 1 -> pool, as pytorch-fid does it.

  batch_size=2 with 3 images also covers the padded last batch, and reuses the compiled
  network of the test above.
  """
  model, _, variables = reference
  images = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  pool, _ = tfi.fid_forward(model, images)
  features = inception.fid_features(variables, images, batch_size=2)
  assert features.dtype == np.float64 and features.shape == (3, 2048)
  assert rel_err(features, pool) <= TOL, rel_err(features, pool)


@needs_torch
@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 512, 512, 3), (1, 40, 333, 3)])
def test_resize_matches_torch_interpolate(shape):
  x = np.random.default_rng(3).random(shape, dtype=np.float32)
  expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  actual = np.asarray(inception.resize_bilinear(x))
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, atol=2e-6, rtol=0)


@needs_torch
def test_preprocess_matches_pytorch_fid_input():
  images = np.random.default_rng(4).integers(0, 256, (2, 100, 80, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  expected = tfi.fid_input(x).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(inception.preprocess(images)), expected, atol=4e-6,
                             rtol=0)


def assert_same_variables(a, b, what):
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b], what
  for (p, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {p}")


def test_npz_and_safetensors_load_the_same_params(tmp_path):
  from safetensors.numpy import save_file
  state = random_state()
  np.savez(tmp_path / "w.npz", **state)
  save_file({k: v for k, v in state.items() if v.ndim}, tmp_path / "w.safetensors")
  variables = inception.load_fid_inception(tmp_path / "w.npz")
  assert_same_variables(variables, inception.load_fid_inception(tmp_path / "w.safetensors"),
                        "safetensors vs npz")
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(  # torch OIHW -> flax HWIO
      params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
      state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["fc"]["kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["bn"]["scale"],
                                state["Mixed_7c.branch_pool.bn.weight"])
  np.testing.assert_array_equal(stats["Mixed_5b"]["branch1x1"]["bn"]["var"],
                                state["Mixed_5b.branch1x1.bn.running_var"])


@needs_torch
def test_pth_loads_like_npz(reference, tmp_path):
  model, _, variables = reference
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
  assert_same_variables(variables, inception.load_fid_inception(tmp_path / "w.npz"),
                        "pth vs npz")


def _save_npz(path, state):
  np.savez(path, **state)
  return path


def test_bad_files_give_clear_errors(tmp_path):
  state = random_state()

  missing = dict(state)
  del missing["Mixed_7c.branch_pool.bn.running_var"]
  with pytest.raises(ValueError, match=r"missing keys.*Mixed_7c\.branch_pool\.bn\.running_var"):
    inception.load_fid_inception(_save_npz(tmp_path / "missing.npz", missing))

  extra = dict(state, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys.*AuxLogits\.fc\.weight"):
    inception.load_fid_inception(_save_npz(tmp_path / "extra.npz", extra))

  wrong = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  path = _save_npz(tmp_path / "wrong.npz", wrong)
  with pytest.raises(ValueError, match=r"wrong\.npz.*fc\.weight: \(1000, 2048\) "
                                       r"\(expected \(1008, 2048\)\)"):
    inception.load_fid_inception(path)

  for name in ("corrupt.safetensors", "corrupt.npz") + (("corrupt.pth",) if torch else ()):
    (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"could not read .*{name}"):
      inception.load_fid_inception(tmp_path / name)

  (tmp_path / "w.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match=r"unsupported .*w\.ckpt"):
    inception.load_fid_inception(tmp_path / "w.ckpt")

  with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*pt_inception-2015-12-05-6726825d"):
    inception.load_fid_inception(tmp_path / "nowhere.pth")


@needs_torch
def test_fid_between_two_image_sets(reference):
  _, path, _ = reference
  rng = np.random.default_rng(5)
  a = rng.integers(0, 200, (4, 64, 64, 3), dtype=np.uint8)
  b = a + np.uint8(50)  # a brighter copy
  same = inception.fid_between(a, a, path, batch_size=2)
  diff = inception.fid_between(a, b, path, batch_size=2)
  assert diff["fid"] > 0 and diff["num_images"] == 4 and diff["num_reference"] == 4
  assert abs(same["fid"]) < 1e-6 * diff["fid"]
