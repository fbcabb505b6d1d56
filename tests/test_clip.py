"""CLIP: the symmetric contrastive loss, the towers, training with the trainer, CLIP score and
reranking."""

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, override, records, tokenizer_path
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.eval import clip_score as clip_score_lib
from jaxt2i.models import clip as clip_model
from jaxt2i.parallel import mesh as mesh_lib, partitioning
from jaxt2i.tasks import clip as clip_task
from jaxt2i.tasks.base import get_task
from jaxt2i.training.config import ConfigError
from jaxt2i.training.trainer import Trainer

sys.path.insert(0, str(REPO))
from configs.clip_shapes import get_config  # noqa: E402

pytestmark = pytest.mark.timeout(300)

LENGTH = 20
TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.load(str(tokenizer_path(tmp_path_factory.mktemp("tok"))))


def tiny_config(tok=None, **overrides):
  fields = {"data.max_caption_length": LENGTH, **overrides}
  if tok is not None:
    fields["data.tokenizer"] = tok.path
  return override(get_config("tiny"), **fields)


def _batch(tok, n=8, split="train"):
  recs = records(max(n, 64), 32, split)[:n]
  tokens, mask = tok.encode([r["caption"] for r in recs], LENGTH)
  images = np.stack([r["image"] for r in recs]).astype(np.float32) / 127.5 - 1.0
  return {"image": jnp.asarray(images), "tokens": jnp.asarray(tokens, jnp.int32),
          "tokens_mask": jnp.asarray(mask, jnp.int32)}


@pytest.fixture(scope="module")
def model(tok):
  """The untrained tiny task, its boxed and unboxed params, and its functions compiled once."""
  task = get_task(tiny_config(tok))
  boxed = jax.jit(task.init)(jax.random.key(0), _batch(tok, 1))

  def loss(params, batch):
    return task.loss(params, batch, jax.random.key(0))
  fns = {"images": jax.jit(task.embed_images), "text": jax.jit(task.embed_text),
         "loss": jax.jit(loss), "grad": jax.jit(jax.value_and_grad(loss, has_aux=True))}
  return task, boxed, partitioning.unbox(boxed), fns


def _np_log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_loss_is_the_symmetric_cross_entropy():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(6, 8))
  txt = rng.normal(size=(6, 8))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  scale = 7.3
  logits = scale * img @ txt.T
  expected = -(np.trace(_np_log_softmax(logits)) + np.trace(_np_log_softmax(logits.T))) / 12
  loss, got_logits = clip_task.contrastive_loss(jnp.asarray(img, jnp.float32),
                                                jnp.asarray(txt, jnp.float32), scale)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # Perfectly separated pairs at a high scale: loss near zero.
  eye = jnp.eye(6, 8)
  assert float(clip_task.contrastive_loss(eye, eye, 100.0)[0]) < 1e-6


def test_retrieval_accuracy_counts_identical_captions_as_right():
  # Captions 0 and 1 are the same text (padding differs only where the mask is 0).
  tokens = jnp.array([[5, 6, 1, 0], [5, 6, 1, 9], [7, 1, 0, 0], [8, 1, 0, 0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
  logits = jnp.array([[0.0, 1.0, 0.0, 0.0],   # image 0 -> caption 1 (same text): right
                      [0.0, 1.0, 0.0, 0.0],   # right
                      [0.0, 0.0, 0.0, 1.0],   # image 2 -> caption 3: wrong
                      [0.0, 0.0, 0.0, 1.0]])  # right
  acc = clip_task.retrieval_accuracy(logits, tokens, mask)
  assert float(acc["image_to_text_acc"]) == 0.75
  # Per caption (column): 0 -> image 0 (first max), 1 -> image 0 (same text), 2 -> image 0
  # (all zero: wrong), 3 -> image 2 (first max; wrong).
  assert float(acc["text_to_image_acc"]) == 0.5


def test_towers_give_unit_embeddings_and_every_weight_is_named(model, tok):
  task, boxed, params, fns = model
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  batch = _batch(tok)
  img = fns["images"](params, batch["image"])
  txt = fns["text"](params, batch["tokens"], batch["tokens_mask"])
  assert img.shape == txt.shape == (8, task.config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
  # Distinct inputs, distinct directions: not a collapsed tower.
  assert np.abs(np.asarray(img) @ np.asarray(img).T - np.eye(8)).max() < 0.9999
  with pytest.raises(ValueError, match="8 images but 3 captions"):
    task.score(params, batch["image"], batch["tokens"][:3], batch["tokens_mask"][:3])
  with pytest.raises(ValueError, match="square \\[N, H, W, 3\\], got shape \\(8, 32, 16, 3\\)"):
    task.embed_images(params, batch["image"][:, :, :16])


def test_logit_scale_starts_at_1_over_007_and_is_capped_at_100(model, tok):
  task, _, params, fns = model
  np.testing.assert_allclose(float(params["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
  batch = _batch(tok)

  def scale_and_grad(value):
    (_, metrics), grads = fns["grad"]({**params, "logit_scale": jnp.float32(value)}, batch)
    return float(metrics["logit_scale"]), float(grads["logit_scale"])

  scale, grad = scale_and_grad(np.log(50.0))
  np.testing.assert_allclose(scale, 50.0, rtol=1e-5)
  assert grad != 0.0
  scale, grad = scale_and_grad(10.0)  # exp(10) ~ 22000
  assert scale == 100.0 and grad == 0.0


def test_gradients_reach_every_parameter(model, tok):
  _, _, params, fns = model
  _, grads = fns["grad"](params, _batch(tok))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    if "['to_k']['bias']" in name:
      # q . b_k shifts all of a query's logits alike, and softmax ignores that: the key bias's
      # gradient is zero in exact arithmetic (rounding noise here).
      assert float(jnp.abs(g).max()) < 1e-5, name
    else:
      assert float(jnp.abs(g).max()) > 1e-8, name


def test_loss_over_a_sharded_global_batch_is_the_whole_batch_loss(model, tok):
  _, boxed, params, fns = model
  batch = _batch(tok, 32)
  # As the trainer runs it: the batch split over data x fsdp, the weights over fsdp x tensor.
  # (This mesh once swapped image rows between batch shards inside the fused step.)
  mesh = mesh_lib.create_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  rules = partitioning.logical_axis_rules("fsdp_tp")
  sharded_params = jax.device_put(params, partitioning.logical_to_shardings(boxed, mesh, rules))
  sharded = jax.device_put(batch, partitioning.batch_sharding(mesh))
  assert sharded["image"].sharding.spec[0] == ("data", "fsdp")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    loss, metrics = fns["loss"](sharded_params, sharded)
  # The numpy loss of the 32 pairs' embeddings, computed on one device.
  img = np.asarray(fns["images"](params, batch["image"]), np.float64)
  txt = np.asarray(fns["text"](params, batch["tokens"], batch["tokens_mask"]), np.float64)
  logits = float(metrics["logit_scale"]) * img @ txt.T
  expected = -(np.trace(_np_log_softmax(logits)) + np.trace(_np_log_softmax(logits.T))) / 64
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  same = np.all(np.asarray(batch["tokens"])[:, None] == np.asarray(batch["tokens"])[None], -1)
  for key, axis in (("image_to_text_acc", 1), ("text_to_image_acc", 0)):
    best = logits.argmax(axis)
    pairs = same[np.arange(32), best] if axis == 1 else same[best, np.arange(32)]
    np.testing.assert_allclose(float(metrics[key]), pairs.mean(), err_msg=key)


def test_bad_configs_name_the_field(tok):
  with pytest.raises(ConfigError, match="model.image_channels"):
    get_task(tiny_config(tok, **{"model.image_channels": (16, 20)}))
  with pytest.raises(ConfigError, match="image_size=34 must be divisible by 2\\^2"):
    get_task(tiny_config(tok, **{"data.image_size": 34}))
  with pytest.raises(ConfigError, match="text_width=32 is not divisible by .*text_heads=3"):
    get_task(tiny_config(tok, **{"model.text_heads": 3}))
  with pytest.raises(ConfigError, match="grad_accum_steps=2"):
    get_task(tiny_config(tok, **{"train.grad_accum_steps": 2}))
  with pytest.raises(ConfigError, match="init_temperature=0"):
    get_task(tiny_config(tok, **{"model.init_temperature": 0.0}))
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    get_config("huge")
  with pytest.raises(ValueError, match="unknown CLIP variant 'huge'"):
    clip_model.variant("huge", 64, 20)


def test_rerank_is_stable_and_descending():
  scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.5],
                     [3.0, 2.0, 1.0, 0.0, -1.0],
                     [0.0, 0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(clip_score_lib.rerank(scores, 3),
                                [[3, 1, 2], [0, 1, 2], [0, 1, 2]])
  np.testing.assert_array_equal(clip_score_lib.rerank(scores, 5)[0], [3, 1, 2, 4, 0])
  # Unsigned scores rank as numbers (negating them would wrap around).
  np.testing.assert_array_equal(clip_score_lib.rerank(np.array([[0, 255, 1]], np.uint8), 2),
                                [[1, 2]])
  # The jax path (the DALL-E pipeline reranks inside jit) agrees, ties included.
  got = jax.jit(lambda s: clip_score_lib.rerank(s, 4))(jnp.asarray(scores, jnp.float32))
  np.testing.assert_array_equal(got, clip_score_lib.rerank(scores, 4))
  with pytest.raises(ValueError, match="k=6 must be an integer in \\[1, 5\\]"):
    clip_score_lib.rerank(scores, 6)
  with pytest.raises(ValueError, match="k=0"):
    clip_score_lib.rerank(scores, 0)
  with pytest.raises(ValueError, match="shape \\(5,\\)"):
    clip_score_lib.rerank(scores[0], 2)
  with_nan = scores.copy()
  with_nan[1, 2] = np.nan
  with pytest.raises(ValueError, match="NaN \\(rows \\[1\\]\\)"):
    clip_score_lib.rerank(with_nan, 2)


def test_rerank_gain_against_hand_counts():
  # Prompt 0: the CLIP-best of 2 is the correct one; of 4, a wrong one (score 0.9) wins.
  # Prompt 1: none correct. Prompt 2: all correct. Prompt 3: a tie the lower index wins.
  scores = np.array([[0.1, 0.5, 0.3, 0.9],
                     [0.4, 0.3, 0.2, 0.1],
                     [0.0, 0.1, 0.2, 0.3],
                     [0.7, 0.7, 0.1, 0.1]])
  correct = np.array([[0, 1, 0, 0],
                      [0, 0, 0, 0],
                      [1, 1, 1, 1],
                      [0, 1, 1, 0]], bool)
  got = clip_score_lib.rerank_gain(scores, correct)
  assert [c["n"] for c in got["curve"]] == [1, 2, 4]
  n1, n2, n4 = got["curve"]
  assert n1 == {"n": 1, "reranked": 0.25, "single": 0.25, "oracle": 0.25}
  assert n2 == {"n": 2, "reranked": 0.5, "single": 0.5, "oracle": 0.75}
  assert n4 == {"n": 4, "reranked": 0.25, "single": 7 / 16, "oracle": 0.75}
  # (correct, wrong) pairs within a prompt: prompt 0 has 3 (0.5 > 0.1, 0.5 > 0.3, 0.5 < 0.9),
  # prompt 3 has 4 (0.7 = 0.7 counts half, 0.7 > 0.1, 0.1 < 0.7, 0.1 = 0.1 counts half).
  assert got["pairs"] == 7
  assert got["pairwise_accuracy"] == pytest.approx((2 + 0.5 + 1 + 0 + 0.5) / 7)
  assert (got["prompts"], got["candidates"]) == (4, 4)
  # A reranker that knows the answer reaches the oracle; one that knows nothing, chance.
  perfect = clip_score_lib.rerank_gain(correct.astype(float), correct, counts=[4])
  assert perfect["curve"][0]["reranked"] == perfect["curve"][0]["oracle"] == 0.75
  assert perfect["pairwise_accuracy"] == 1.0
  assert np.isnan(clip_score_lib.rerank_gain(scores, np.zeros((4, 4), bool))
                  ["pairwise_accuracy"])
  # Graded quality: the CLIP-best's quality against the mean and the best of the first n.
  graded = clip_score_lib.rerank_gain(scores[:1], [[0.2, 0.6, 1.0, 0.4]], counts=[2, 4])
  assert graded["curve"] == [{"n": 2, "reranked": 0.6, "single": 0.4, "oracle": 0.6},
                             {"n": 4, "reranked": 0.4, "single": 0.55, "oracle": 1.0}]
  # Pairs by quality: 0.6 > 0.2 (scores 0.5 > 0.1: right), 1.0 > each other one (its 0.3
  # beats only 0.1), 0.4 > 0.2 (0.9 > 0.1: right), 0.6 > 0.4 (0.5 < 0.9: wrong): 3 of 6.
  assert graded["pairs"] == 6 and graded["pairwise_accuracy"] == pytest.approx(3 / 6)
  with pytest.raises(ValueError, match="must both be \\[prompts, candidates\\]"):
    clip_score_lib.rerank_gain(scores, correct[:, :3])
  with pytest.raises(ValueError, match="count 5 must be an integer in \\[1, 4\\]"):
    clip_score_lib.rerank_gain(scores, correct, counts=[5])
  with pytest.raises(ValueError, match="NaN"):
    clip_score_lib.rerank_gain(scores, np.full((4, 4), np.nan))
  with pytest.raises(ValueError, match="numbers or booleans"):
    clip_score_lib.rerank_gain(scores, np.full((4, 4), "yes"))


def test_per_pair_score_formula():
  np.testing.assert_allclose(clip_score_lib.per_pair_score([-0.5, 0.0, 0.3, 1.0]),
                             [0.0, 0.0, 30.0, 100.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok):
  workdir = tmp_path_factory.mktemp("clip")
  config = tiny_config(tok, **{"train.num_steps": TRAIN_STEPS, "train.log_every": 5,
                               "optim.decay_steps": TRAIN_STEPS})
  # One device: compiles faster; the sharded loss is checked above.
  trainer = Trainer(config, workdir, source=records(128, 32), tokenizer=tok,
                    eval_source=records(64, 32, "test"), devices=jax.devices()[:1])
  try:
    trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  return workdir


def test_training_learns_to_retrieve(trained):
  lines = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  loss = np.array([l["train/loss"] for l in train])
  chance = 1 / 32
  assert len(train) == TRAIN_STEPS // 5
  assert loss[-1] < 0.5 * loss[0], loss
  assert loss[0] > 0.9 * np.log(32)  # no better than chance at the start
  for key in ("train/image_to_text_acc", "train/text_to_image_acc"):
    assert train[-1][key] > 10 * chance, (key, train[-1][key])
  (final,) = [l for l in lines if "eval/loss" in l]
  # Held-out `test` scenes: retrieval well above chance, matching pairs closer than others.
  assert final["eval/image_to_text_acc"] > 3 * chance, final
  assert final["eval/text_to_image_acc"] > 3 * chance, final
  assert final["eval/positive_cosine"] > final["eval/negative_cosine"] + 0.1, final
  assert 0 < final["eval/logit_scale"] <= 100


def test_clip_score_of_a_trained_run(trained, tok):
  scorer = clip_score_lib.CLIPScorer.load(trained, batch_size=16)
  recs = records(128, 32)[:40]  # 40: the last batch of 16 is padded
  images = np.stack([r["image"] for r in recs])
  captions = [r["caption"] for r in recs]
  scores = scorer.scores(images, captions)
  assert scores.shape == (40,) and np.all((scores >= 0) & (scores <= 100))
  # The same pairs through the task's jit-able score, from float images in the value range.
  tokens, mask = tok.encode(captions, LENGTH)
  direct = jax.jit(scorer.task.score)(
      scorer.params, jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
      jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
  np.testing.assert_allclose(scores, 100 * np.maximum(np.asarray(direct), 0), atol=1e-3)
  matched = clip_score_lib.clip_score(scorer, images, captions)
  assert matched == pytest.approx(float(scores.mean()))
  shuffled = [captions[(i + 1) % 40] for i in range(40)]
  mismatched = clip_score_lib.clip_score(scorer, images, shuffled)
  assert matched > mismatched + 10, (matched, mismatched)
  # Reranking each image's candidate captions puts its own first for most images.
  cos = scorer.image_embeddings(images) @ scorer.text_embeddings(captions).T
  assert np.mean(clip_score_lib.rerank(cos, 1)[:, 0] == np.arange(40)) > 0.5
  # Other square sizes are resized to the run's 32 px.
  big = np.repeat(np.repeat(images[:4], 2, 1), 2, 2)
  assert scorer.image_embeddings(big).shape == (4, scorer.task.config.model.embed_dim)
  with pytest.raises(ValueError, match="40 images but 39 captions"):
    scorer.scores(images, captions[:39])
  with pytest.raises(ValueError, match="need a 'clip' task"):
    clip_score_lib.CLIPScorer(object(), scorer.params, tok)
