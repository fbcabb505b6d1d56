"""DALL-E end to end at tiny sizes: frozen dVAE (and CLIP), training, sampling, reranking."""

import json
import sys

import jax
import numpy as np
import pytest

import jaxt2i
from helpers import (NO_FINAL_EVAL, REPO, override, random_params, random_run, read_item,
                     records, tokenizer_path, train_run)
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.tasks.base import get_task
from jaxt2i.training.config import ConfigError

sys.path.insert(0, str(REPO))
from configs.clip_shapes import get_config as clip_config  # noqa: E402
from configs.dalle_shapes import get_config as dalle_config  # noqa: E402
from configs.dvae_shapes import get_config as dvae_config  # noqa: E402

pytestmark = pytest.mark.timeout(300)
LENGTH = 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.load(str(tokenizer_path(tmp_path_factory.mktemp("tok"))))


# The frozen parts at random weights: the transformer reads and freezes them as it would
# trained ones (training the dVAE and CLIP: test_dvae.py, test_clip.py).
@pytest.fixture(scope="module")
def dvae_dir(tmp_path_factory):
  return random_run(dvae_config("tiny"), tmp_path_factory.mktemp("dvae"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tok):
  config = override(clip_config("tiny"), **{"data.tokenizer": tok.path,
                                            "data.max_caption_length": LENGTH})
  return random_run(config, tmp_path_factory.mktemp("clip"))


def tiny_dalle(dvae_dir, tok, **overrides):
  return override(dalle_config("tiny"), **{
      "model.dvae_workdir": str(dvae_dir), "data.tokenizer": tok.path,
      "data.max_caption_length": LENGTH, **overrides})


@pytest.fixture(scope="module")
def dalle_run(tmp_path_factory, dvae_dir, tok):
  """Trained without CLIP: tests attach one when loading (as a user who trains CLIP later)."""
  workdir = tmp_path_factory.mktemp("dalle")
  trainer, state = train_run(tiny_dalle(dvae_dir, tok, **NO_FINAL_EVAL), workdir,
                             source=records(64, 32), tokenizer=tok)
  return workdir, trainer, state


@pytest.fixture(scope="module")
def dalle_dir(tmp_path_factory, dvae_dir, tok):
  """A transformer run at random weights (without CLIP) for the sampling tests."""
  return random_run(tiny_dalle(dvae_dir, tok), tmp_path_factory.mktemp("dalle_random"))


def test_config_errors(dvae_dir, tok):
  with pytest.raises(ConfigError, match="dvae_workdir is empty"):
    get_task(dalle_config("tiny"))
  with pytest.raises(ConfigError, match="num_candidates=4 needs a CLIP run"):
    get_task(tiny_dalle(dvae_dir, tok, **{"model.num_candidates": 4}))
  with pytest.raises(ConfigError, match="attention_patterns: unknown"):
    get_task(tiny_dalle(dvae_dir, tok, **{"model.attention_patterns": ("row", "diagonal",
                                                                        "row", "conv")}))
  with pytest.raises(ConfigError, match="is a 'dvae' run, not 'clip'"):
    task = get_task(tiny_dalle(dvae_dir, tok, **{"model.clip_workdir": str(dvae_dir)}))
    task.initial_values()


def run_weights(run):
  """A run's weights as its frozen copies use them: EMA where the run kept it."""
  step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  ema = any((run / "checkpoints" / str(step) / "ema_params").glob("*"))
  return read_item(run, "ema_params" if ema else "params")[1]


def assert_same_tree(original, copy, name):
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(original),
                               jax.tree_util.tree_leaves_with_path(copy)):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=name + jax.tree_util.keystr(path))


def test_loss_trains_the_transformer_and_not_the_frozen_parts(dvae_dir, clip_dir, tok):
  """The training loss on random weights (the fast suite's DALL-E step; whole runs are slow
  tests): image cross-entropy near log(codebook size), and gradients reach every transformer
  weight and neither the dVAE nor CLIP."""
  task = get_task(tiny_dalle(dvae_dir, tok, **{"model.clip_workdir": str(clip_dir)}))
  assert task.frozen_keys == ("dvae", "clip")
  scenes = records(8, 32)
  tokens, mask = tok.encode([r["caption"] for r in scenes], LENGTH)
  batch = {"image": np.stack([r["image"] for r in scenes]).astype(np.float32) / 127.5 - 1.0,
           "tokens": tokens.astype(np.int32), "tokens_mask": mask.astype(np.int32)}
  params = random_params(jax.eval_shape(task.init, jax.random.key(0), batch))
  params.update(task.initial_values())
  (loss, aux), grads = jax.jit(jax.value_and_grad(
      lambda p: task.loss(p, batch, jax.random.key(1)), has_aux=True))(params)
  assert np.isfinite(loss)
  assert abs(float(aux["image_loss"]) - np.log(64)) < 1.0
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name, g = jax.tree_util.keystr(path), np.asarray(g)
    assert np.isfinite(g).all(), name
    if name.startswith(("['dvae']", "['clip']")):
      assert not g.any(), f"the frozen {name} gets a gradient"
    else:
      assert g.any(), f"no gradient reaches {name}"


@pytest.mark.slow  # ~50 s on 2 cores: compiling the transformer's init and train step
def test_trains_with_frozen_parts(dalle_run, dvae_dir, clip_dir, tok):
  workdir, trainer, _ = dalle_run
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["dvae"]["task"] == "dvae" and not saved["model"]["clip"]
  assert_same_tree(run_weights(dvae_dir)["dvae"], read_item(workdir, "params")[1]["dvae"],
                   "dvae")
  # Trained with a CLIP run, its weights start the run (frozen) and its config is copied.
  task = get_task(tiny_dalle(dvae_dir, tok, **{"model.clip_workdir": str(clip_dir)}))
  assert_same_tree(run_weights(clip_dir), task.initial_values()["clip"], "clip")
  assert task.config.model.clip.task == "clip" and task.frozen_keys == ("dvae", "clip")
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert len(losses) == 4 and all(np.isfinite(losses))
  # Untrained, the image cross-entropy starts near log(codebook size).
  assert abs(lines[0]["train/image_loss"] - np.log(64)) < 1.0


def test_pipeline_samples_and_reranks(dalle_dir, dvae_dir, clip_dir):
  workdir = dalle_dir
  pipe = jaxt2i.load(workdir)
  prompts = ["a small red circle in the top left", "a large blue square at the bottom"]
  a = pipe(prompts, num_images_per_prompt=2, seed=0, output="np")
  assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, pipe(prompts, num_images_per_prompt=2, seed=0, output="np"))
  assert not np.array_equal(a, pipe(prompts, num_images_per_prompt=2, seed=1, output="np"))
  # Sampling settings are traced: new values reuse the compiled program.
  before = pipe.num_compilations
  pipe(prompts, num_images_per_prompt=2, seed=2, temperature=0.7, top_k=5, top_p=0.9,
       output="np")
  pipe(prompts, num_images_per_prompt=2, seed=3, temperature=1.3, top_k=2, top_p=0.5,
       output="np")
  assert pipe.num_compilations == before + 1
  # top_k=1 is greedy: every seed gives the same images (still the same program).
  greedy = dict(num_images_per_prompt=2, temperature=1.0, top_k=1, top_p=1.0, output="np")
  g0 = pipe(prompts, seed=0, **greedy)
  np.testing.assert_array_equal(g0, pipe(prompts, seed=7, **greedy))
  assert pipe.num_compilations == before + 1

  # Reranking needs a CLIP run; one trained after the transformer is attached when loading.
  with pytest.raises(ValueError, match="attach a CLIP run when loading"):
    pipe(prompts, num_candidates=4)
  with pytest.raises(ConfigError, match="is a 'dvae' run, not 'clip'"):
    jaxt2i.load(workdir, clip_workdir=str(dvae_dir))
  pipe = jaxt2i.load(workdir, clip_workdir=str(clip_dir))
  assert pipe.config.model.clip.task == "clip"
  assert_same_tree(run_weights(clip_dir), pipe.params["clip"], "clip")
  # The K kept images are the CLIP-best of the N candidates, best first.
  task = pipe.task
  ranked = pipe(prompts, num_candidates=4, rerank=2, seed=5, output="np")
  assert ranked.shape == (4, 32, 32, 3)
  pool = pipe([p for p in prompts for _ in range(4)], seed=5, output="np")
  tokens, mask = pipe._encode([p for p in prompts for _ in range(4)])
  scores = np.asarray(task.clip_task.score(pipe.params["clip"], pool, tokens, mask))
  for i in range(2):
    order = np.argsort(-scores[4 * i:4 * i + 4], kind="stable")[:2]
    kept = pool[4 * i:4 * i + 4][order]
    np.testing.assert_array_equal(ranked[2 * i:2 * i + 2], kept)
  with pytest.raises(ValueError, match=r"rerank=5 must be in \[1, num_candidates=4\]"):
    pipe(prompts, num_candidates=4, rerank=5)
  with pytest.raises(ValueError, match="unknown sampling setting"):
    pipe(prompts, typo_k=3)


@pytest.mark.slow  # ~40 s: two more sampling programs
def test_guidance_programs(dalle_run):
  workdir, _, _ = dalle_run
  pipe = jaxt2i.load(workdir)
  prompts = ["a small red circle in the top left"]
  plain = pipe(prompts, seed=4, guidance_scale=1.0, output="np")
  assert pipe.num_compilations == 1  # scale 1: the program without the unconditional branch
  guided = pipe(prompts, seed=4, guidance_scale=2.0, negative_prompt="a large blue square",
                output="np")
  pipe(prompts, seed=4, guidance_scale=3.0, output="np")
  assert pipe.num_compilations == 2  # one guided program for every scale and negative prompt
  assert plain.shape == guided.shape == (1, 32, 32, 3)

