"""LoRA: the params transform (models/lora.py), LoRA files in the diffusers / PEFT and kohya
layouts against diffusers + PEFT's own loading and fusing, and LoRA training with the shared
trainer (base model out of the optimizer and the checkpoint)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models import lora


def _params(rng):
  return {"block": {"to_q": {"kernel": rng.standard_normal((8, 2, 4)).astype(np.float32)},
                    "to_out_0": {"kernel": rng.standard_normal((2, 4, 8)).astype(np.float32),
                                 "bias": np.zeros(8, np.float32)},
                    "proj": {"kernel": rng.standard_normal((8, 8)).astype(np.float32)}}}


def test_merge_is_the_low_rank_update():
  rng = np.random.default_rng(0)
  params = _params(rng)
  adapters = lora.init_adapters(params, rank=3, rng=jax.random.key(0))
  assert set(adapters["block"]) == {"to_q", "to_out_0"}  # attention projections only
  assert adapters["block"]["to_q"]["down"].shape == (8, 3)
  assert adapters["block"]["to_out_0"]["down"].shape == (8, 3)  # in = heads * head_dim
  assert adapters["block"]["to_out_0"]["up"].shape == (3, 8)
  assert float(jnp.abs(adapters["block"]["to_q"]["down"]).max()) <= 1 / np.sqrt(8)
  # Fresh adapters change nothing (up = 0).
  same = lora.merge(params, adapters, 2.0)
  np.testing.assert_array_equal(same["block"]["to_q"]["kernel"], params["block"]["to_q"]["kernel"])

  adapters = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), adapters)
  merged = lora.merge(params, adapters, 0.5)
  assert merged["block"]["proj"] is params["block"]["proj"]  # untouched leaves are shared
  # x @ W' == x @ W + 0.5 * (x @ down) @ up, with W' the merged kernel in its own layout.
  x = rng.standard_normal((5, 8)).astype(np.float32)
  for name, n_in in (("to_q", 8), ("to_out_0", 8)):
    kernel = params["block"][name]["kernel"]
    w, w_merged = kernel.reshape(n_in, -1), merged["block"][name]["kernel"].reshape(n_in, -1)
    a = adapters["block"][name]
    np.testing.assert_allclose(x @ w_merged, x @ w + 0.5 * (x @ a["down"]) @ a["up"],
                               rtol=1e-5, atol=1e-5)
  back = lora.unmerge(merged, adapters, 0.5)
  np.testing.assert_allclose(back["block"]["to_out_0"]["kernel"],
                             params["block"]["to_out_0"]["kernel"], atol=1e-6)
  # Inside jit, gradients reach the adapters through the merged kernel.
  grads = jax.grad(lambda a: jnp.sum(
      lora.merge(params, a)["block"]["to_q"]["kernel"] ** 2))(adapters)
  assert float(jnp.abs(grads["block"]["to_q"]["up"]).sum()) > 0
  assert lora.count(adapters) == 2 * (8 * 3 + 3 * 8)

  with pytest.raises(ValueError, match="match no kernel"):
    lora.init_adapters(params, 2, jax.random.key(0), targets="nothing")
  conv = {"conv": {"kernel": np.zeros((3, 3, 4, 4), np.float32)}}
  with pytest.raises(ValueError, match="is a convolution"):
    lora.init_adapters(conv, 2, jax.random.key(0), targets="conv")
  with pytest.raises(ValueError, match="no such module"):
    lora.merge(params, {"block": {"missing": {"down": x, "up": x}}})


# -- files ----------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _with_peft_adapters(pipe, rank=4, alpha=8):
  """Adds random (non-zero) PEFT LoRA adapters to the pipeline's U-Net and text encoder;
  returns their LoraConfigs."""
  config = dict(r=rank, lora_alpha=alpha, init_lora_weights=False)
  torch.manual_seed(1)
  unet_config = peft.LoraConfig(target_modules=_UNET_TARGETS, **config)
  text_config = peft.LoraConfig(target_modules=_TEXT_TARGETS, **config)
  pipe.unet.add_adapter(unet_config)
  # (peft's own injection: transformers' add_adapter wants a newer peft than the registry's)
  peft.inject_adapter_in_model(text_config, pipe.text_encoder)
  for module in (pipe.unet, pipe.text_encoder):  # PEFT leaves lora_B small; make it count
    for name, p in module.named_parameters():
      if "lora_" in name:
        p.data = torch.randn_like(p) * 0.3
  return unet_config, text_config


def _lora_state(module):
  """PEFT's adapter state_dict ("...q_proj.lora_A.weight"), as get_peft_model_state_dict."""
  return {k.replace(".default", ""): v for k, v in module.state_dict().items() if "lora_" in k}


def _fused_params(pipe, folder):
  """jaxt2i params of the diffusers pipeline's weights with its LoRA merged in by PEFT."""
  import jaxt2i
  from jaxt2i.convert import diffusers_unet, transformers_clip
  from peft.tuners.tuners_utils import BaseTunerLayer
  layers = [m for model in (pipe.unet, pipe.text_encoder) for m in model.modules()
            if isinstance(m, BaseTunerLayer)]
  for layer in layers:
    layer.merge()
  ours = jaxt2i.from_diffusers(folder, compilation_cache=False)
  unet, text = ({k.replace(".base_layer", ""): v.detach().numpy().copy()
                 for k, v in model.state_dict().items() if "lora_" not in k}
                for model in (pipe.unet, pipe.text_encoder))
  for layer in layers:
    layer.unmerge()
  return (diffusers_unet.unet_params_from_diffusers(unet, ours.task.unet),
          transformers_clip.clip_text_params_from_transformers(text, ours.task.text_encoder))


def _assert_tree_close(ours, theirs, atol):
  flat = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(ours))[0])
  for path, value in jax.tree_util.tree_flatten_with_path(theirs)[0]:
    np.testing.assert_allclose(np.asarray(flat[path]), value, atol=atol, err_msg=str(path))


def _kohya(state, alpha):
  """The diffusers / PEFT LoRA state_dict in kohya-ss naming, with per-module alphas."""
  out = {}
  for key, value in state.items():
    component, rest = key.split(".", 1)
    module, part = rest.rsplit(".lora_", 1)
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    name = prefix + module.replace(".", "_")
    out[f"{name}.lora_down.weight" if part == "A.weight" else f"{name}.lora_up.weight"] = value
    out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
  return out


def test_lora_files_match_diffusers(tmp_path):
  """A PEFT LoRA saved by diffusers (with its adapter metadata) and the same weights in
  kohya's layout load into jaxt2i's pipeline as the kernels PEFT fuses; the pipeline draws
  diffusers' images; unload_lora restores the base."""
  import jaxt2i
  from helpers import sd_folder
  from safetensors.numpy import save_file
  folder, reference = sd_folder(tmp_path)
  unet_config, text_config = _with_peft_adapters(reference)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path / "lora", unet_lora_layers=_lora_state(reference.unet),
      text_encoder_lora_layers=_lora_state(reference.text_encoder),
      unet_lora_adapter_metadata=unet_config.to_dict(),
      text_encoder_lora_adapter_metadata=text_config.to_dict())
  unet, text = _fused_params(reference, folder)

  pipe = jaxt2i.from_diffusers(folder, compilation_cache=False)
  base = jax.device_get(pipe.params)
  # 4 transformer blocks x (attn1, attn2) x 4 projections; 2 CLIP layers x 4
  assert pipe.load_lora(tmp_path / "lora") == 4 * 2 * 4 + 2 * 4
  _assert_tree_close(pipe.params["unet"], unet, atol=1e-5)
  _assert_tree_close(pipe.params["text_encoder"], text, atol=1e-5)
  latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    theirs = reference(["a red circle"], num_inference_steps=3, guidance_scale=7.5,
                       latents=torch.from_numpy(latents), output_type="np").images
  ours = pipe(["a red circle"], steps=3, guidance_scale=7.5,
              latents=latents.transpose(0, 2, 3, 1), output="np")
  np.testing.assert_allclose(ours / 255.0, theirs, atol=1.5 / 255)
  pipe.unload_lora()
  _assert_tree_close(pipe.params, base, atol=1e-5)

  # kohya: alpha 2 at rank 4 halves the update of a file with the same matrices (whose
  # metadata said alpha 8: scale 2), so scale 4 on load gives PEFT's fused kernels.
  from safetensors.numpy import load_file
  peft_state = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
  save_file(_kohya(peft_state, alpha=2.0), str(tmp_path / "kohya.safetensors"))
  pipe.load_lora(tmp_path / "kohya.safetensors", scale=4.0)
  _assert_tree_close(pipe.params["unet"], unet, atol=1e-5)
  _assert_tree_close(pipe.params["text_encoder"], text, atol=1e-5)
  pipe.unload_lora()

  # Errors name what does not fit.
  bad = dict(peft_state)
  bad["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_z.lora_A.weight"] = \
      np.zeros((4, 32), np.float32)
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match="to_z \\(no such module\\)"):
    pipe.load_lora(tmp_path / "bad.safetensors")
  save_file({"lora_te2_text_model_x.alpha": np.ones(())}, str(tmp_path / "sdxl.safetensors"))
  with pytest.raises(ValueError, match="SDXL"):
    pipe.load_lora(tmp_path / "sdxl.safetensors")


def test_older_diffusers_lora_keys(tmp_path):
  """diffusers' attention-processor LoRA keys (to_q_lora.down / .up, lora_linear_layer)."""
  from jaxt2i.convert import diffusers_unet, lora as lora_files
  from jaxt2i.models.unet import UNet
  unet = UNet(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
              attention_head_dim=4, norm_num_groups=8)
  layout = diffusers_unet.expected_layout(unet)
  rng = np.random.default_rng(0)
  block = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
  down, up = rng.standard_normal((2, 32)), rng.standard_normal((32, 2))
  state = {f"unet.{block}.processor.to_out_lora.down.weight": down,
           f"unet.{block}.processor.to_out_lora.up.weight": up}
  adapters = lora_files.adapters_from_state_dict(state, {"unet": layout})
  node = adapters["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]
  np.testing.assert_allclose(node["to_out_0"]["down"], down.T)
  np.testing.assert_allclose(node["to_out_0"]["up"], up.T)
  with pytest.raises(ValueError, match="needs both down and up"):
    lora_files.adapters_from_state_dict({f"unet.{block}.to_q.lora_A.weight": down},
                                        {"unet": layout})
  with pytest.raises(ValueError, match="do not fit"):
    lora_files.adapters_from_state_dict({f"unet.{block}.to_q.lora_A.weight": down,
                                         f"unet.{block}.to_q.lora_B.weight": up[:8]},
                                        {"unet": layout})


@pytest.mark.slow  # ~2 min on 2 cores: compiling the trainer's step and the sampler
def test_lora_training_with_the_trainer(tmp_path):
  """configs/sd_lora.py: only the adapters train and are checkpointed (the base stays the
  folder's); jaxt2i.load samples the merged model; the exported LoRA file makes diffusers'
  pipeline fuse the same U-Net and text encoder kernels."""
  import jaxt2i
  from configs.sd_lora import get_config
  from helpers import override, read_item, records, sd_folder, train_run
  from jaxt2i.convert import diffusers_unet, transformers_clip
  folder, reference = sd_folder(tmp_path)
  config = override(get_config(str(folder)), **{
      "batch_size": 4, "train.num_steps": 2, "train.compute_dtype": "float32",
      "data.worker_count": 0, "optim.warmup_steps": 1, "optim.learning_rate": 1e-2,
      "checkpoint.every_steps": 100, "model.lora_text_encoder": True, "model.lora_alpha": 8.0})
  _, state = train_run(config, tmp_path / "run", source=records(8, 32))
  assert set(state.params) == {"lora"} and state.ema_params is None
  _, saved = read_item(tmp_path / "run")
  assert set(saved) == {"lora"} and set(saved["lora"]) == {"unet", "text_encoder"}
  adapters = lora.count(saved["lora"])
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * adapters + 4
  assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(saved["lora"]))  # `up` moved

  pipe = jaxt2i.load(tmp_path / "run", compilation_cache=False)
  base = jaxt2i.from_diffusers(folder, compilation_cache=False)
  expected = lora.merge(jax.device_get(base.params), saved["lora"], 8.0 / 4)
  _assert_tree_close(pipe.params, expected, atol=1e-6)
  assert pipe(["a red circle"], steps=2, output="np").shape == (1, 16, 16, 3)

  out = pipe.save_lora(tmp_path / "exported")
  reference.load_lora_weights(out)
  reference.fuse_lora(components=["unet", "text_encoder"])
  unet = {k.replace(".base_layer", ""): v.detach().numpy()
          for k, v in reference.unet.state_dict().items() if "lora_" not in k}
  text = {k.replace(".base_layer", ""): v.detach().numpy()
          for k, v in reference.text_encoder.state_dict().items() if "lora_" not in k}
  _assert_tree_close(pipe.params["unet"],
                     diffusers_unet.unet_params_from_diffusers(unet, pipe.task.unet), 1e-5)
  _assert_tree_close(pipe.params["text_encoder"], transformers_clip.
                     clip_text_params_from_transformers(text, pipe.task.text_encoder), 1e-5)
