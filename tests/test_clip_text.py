"""CLIP's text encoder and tokenizer (Stable Diffusion's text side) against transformers:
random-init CLIPTextModels saved locally, converted, same outputs; the BPE tokenizer's rows as
StableDiffusionPipeline builds them."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import write_clip_vocab  # noqa: E402
from jaxt2i.convert import transformers_clip  # noqa: E402
from jaxt2i.data.tokenizer import CLIPTokenizer  # noqa: E402
from jaxt2i.models.text_encoder import CLIPTextTransformer  # noqa: E402

# SD 1.x-like (quick GELU, pooled at the highest id) and SD 2.x-like (exact GELU, pooled at
# an explicit end-of-text id, uneven widths).
CONFIGS = {
    "sd1": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                eos_token_id=2),
    "sd2": dict(vocab_size=120, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=6, max_position_embeddings=12, hidden_act="gelu",
                layer_norm_eps=1e-6, eos_token_id=119),
}


def _rel_err(ours, theirs):
  theirs = theirs.detach().numpy()
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_text_encoder_matches_transformers(tmp_path, name):
  config = CONFIGS[name]
  torch.manual_seed(0)
  reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
  folder = tmp_path / "sd" / "text_encoder"
  reference.save_pretrained(folder)
  model, params = transformers_clip.load_clip_text_encoder(tmp_path / "sd")  # SD folder
  assert model.hidden_act == config["hidden_act"] and model.eos_token_id == config["eos_token_id"]

  length = config["max_position_embeddings"]
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config["vocab_size"] - 1, (3, length))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  if name == "sd2":  # pooled where the end-of-text id stands
    ids[:, 5] = config["eos_token_id"]
  with torch.no_grad():
    theirs = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       output_hidden_states=True)
  ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                     output_hidden_states=True)
  assert _rel_err(ours["last_hidden_state"], theirs.last_hidden_state) <= 1e-4
  assert _rel_err(ours["pooled"], theirs.pooler_output) <= 1e-4
  assert len(ours["hidden_states"]) == len(theirs.hidden_states)
  for a, b in zip(ours["hidden_states"], theirs.hidden_states):
    assert _rel_err(a, b) <= 1e-4
  final_norm = getattr(reference, "text_model", reference).final_layer_norm
  assert _rel_err(ours["penultimate"], final_norm(theirs.hidden_states[-2])) <= 1e-4
  # Without a padding mask: causal only, as for SD's unpadded-mask prompts.
  with torch.no_grad():
    theirs = reference(torch.from_numpy(ids))
  ours = model.apply({"params": params}, jnp.asarray(ids))
  assert _rel_err(ours["last_hidden_state"], theirs.last_hidden_state) <= 1e-4


def test_clip_text_errors(tmp_path):
  model = CLIPTextTransformer(**CONFIGS["sd1"])
  with pytest.raises(ValueError, match="missing keys"):
    transformers_clip.clip_text_params_from_transformers({}, model)
  with pytest.raises(ValueError, match="at most 16"):
    model.init(__import__("jax").random.key(0), jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(FileNotFoundError, match="config.json"):
    transformers_clip.load_clip_text_encoder(tmp_path)
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    transformers_clip.clip_text_config_from_transformers({"hidden_act": "relu"})


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_tokenizer_rows(tmp_path, caplog, pad_token):
  reference = write_clip_vocab(tmp_path / "sd" / "tokenizer", pad_token)
  tok = CLIPTokenizer.load(tmp_path / "sd")  # an SD folder, with vocab.json and merges.txt
  reference.save_pretrained(tmp_path / "saved")  # transformers 5 writes tokenizer.json
  assert (tok.encode(["a red circle"])[0]
          == CLIPTokenizer.load(tmp_path / "saved").encode(["a red circle"])[0]).all()
  prompts = ["a red circle", "", "Blue  CIRCLE!",
             "a red circle a blue circle a red circle a blue circle"]
  ids, mask = tok.encode(prompts)
  expected = reference(prompts, padding="max_length", max_length=12, truncation=True)
  np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
  assert ids.dtype == np.int32 and ids.shape == (4, 12)
  assert tok.pad_id == reference.pad_token_id and tok.eos_id == reference.eos_token_id
  assert (ids[:, 0] == tok.bos_id).all()
  assert mask[1].tolist() == [True, True] + [False] * 10  # start and end of text only
  lengths = [min(len(seq), 12) for seq in reference(prompts)["input_ids"]]
  np.testing.assert_array_equal(mask.sum(1), lengths)
  assert all(mask[i, :n].all() for i, n in enumerate(lengths))
  assert ids[3, -1] == tok.eos_id and mask[3].all()
  assert "truncated 1 of 4 prompts to 12 tokens" in caplog.text
  with caplog.at_level(logging.WARNING):
    ids, mask = tok.encode(["a red circle"], max_length=20)
  assert ids.shape == (1, 20) and mask[0].sum() == 5  # bos, a, red, circle, eos
  with pytest.raises(TypeError, match="sequence of texts"):
    tok.encode("a red circle")
  with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt, or tokenizer.json"):
    CLIPTokenizer.load(tmp_path / "nothing")
