"""Stable Diffusion interop: diffusers AutoencoderKL folders load into jaxt2i's KL
autoencoder with the same posteriors and decodings (random-init reference models saved
locally; nothing is downloaded)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxt2i.convert import diffusers_vae  # noqa: E402

VAE_CONFIGS = {
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       latent_channels=4),
    "three_levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2,
                         norm_num_groups=16, latent_channels=8, scaling_factor=0.13025),
}


def _vae(config):
  levels = len(config["block_out_channels"])
  torch.manual_seed(0)
  return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                 up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()


def _rel_err(ours, theirs):
  theirs = theirs.detach().numpy().transpose(0, 2, 3, 1)
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_matches_diffusers(tmp_path, name):
  reference = _vae(VAE_CONFIGS[name])
  reference.save_pretrained(tmp_path / "sd" / "vae")
  model, params, scaling = diffusers_vae.load_diffusers_vae(tmp_path / "sd")  # SD folder
  assert scaling == VAE_CONFIGS[name].get("scaling_factor", 0.18215)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 24)).astype(np.float32)
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images)).latent_dist
    decoded = reference.decode(posterior.mean).sample
  ours = model.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)),
                     method=model.encode)
  assert _rel_err(ours["mean"], posterior.mean) <= 1e-4
  assert _rel_err(ours["logvar"], posterior.logvar) <= 1e-4
  out = model.apply({"params": params}, ours["mean"], method=model.decode)
  assert _rel_err(out, decoded) <= 1e-4


def test_vae_old_attention_names(tmp_path):
  """Checkpoints from before diffusers 0.14 name the mid-block attention query / key / value /
  proj_attn, and the original LDM layout stores them as 1x1 convolutions."""
  reference = _vae(VAE_CONFIGS["two_levels"])
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in reference.state_dict().items():
    for new, legacy in renames.items():
      key = key.replace(f".{new}.", f".{legacy}.")
    if ".proj_attn.weight" in key or ".query.weight" in key:
      value = value[:, :, None, None]
    old[key] = value.numpy()
  fields, _ = diffusers_vae.vae_config_from_diffusers(dict(reference.config))
  model = diffusers_vae.Autoencoder(**fields)
  params = diffusers_vae.vae_params_from_diffusers(old, model)
  current = diffusers_vae.vae_params_from_diffusers(
      {k: v.numpy() for k, v in reference.state_dict().items()}, model)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(current)):
    np.testing.assert_array_equal(a, b)


def test_vae_errors(tmp_path):
  reference = _vae(VAE_CONFIGS["two_levels"])
  config = dict(reference.config)
  with pytest.raises(ValueError, match="use_quant_conv=False"):
    diffusers_vae.vae_config_from_diffusers({**config, "use_quant_conv": False})
  with pytest.raises(ValueError, match="down_block_types"):
    diffusers_vae.vae_config_from_diffusers(
        {**config, "down_block_types": ["DownBlock2D", "DownBlock2D"]})
  fields, _ = diffusers_vae.vae_config_from_diffusers(config)
  with pytest.raises(ValueError, match="missing keys"):
    diffusers_vae.vae_params_from_diffusers({}, diffusers_vae.Autoencoder(**fields))
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                            if not k.startswith("_")}))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    diffusers_vae.load_diffusers_vae(tmp_path)
