"""`jaxt2i eval` on a trained run, and the trainer's periodic shapes-v1 eval hook."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, records, tiny_config, tokenizer_path
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.eval import runner
from jaxt2i.training import config as config_lib
from jaxt2i.training.trainer import Trainer

# The first test here may train the tests' quick 64px evaluator (conftest.quick_evaluator_64):
# its setup counts against the limit.
pytestmark = pytest.mark.timeout(600)


def _config(tok_path, **overrides):
  # 64 px, so the (cached) 64 px evaluator scores it.
  return tiny_config(**{"data.image_size": 64, "data.tokenizer": str(tok_path), **overrides})


def _train(config, workdir, tok):
  trainer = Trainer(config, workdir, source=records(64, 64), tokenizer=tok)
  try:
    return trainer, trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return tokenizer_path(tmp_path_factory.mktemp("tok"))


def test_eval_hook_logs_scores_and_grids(tmp_path, tok_path, quick_evaluator_64):
  del quick_evaluator_64
  config = _config(tok_path, **{"eval.shapes_prompts": 3, "eval.samples_per_prompt": 2,
                                "train.eval_every": 2})
  _train(config, tmp_path, Tokenizer.load(str(tok_path)))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [l for l in lines if "eval/shapes_test/fully_correct" in l]
  assert [l["step"] for l in evals] == [2, 4]
  for key in ("fully_correct", "color", "shape", "size", "place", "count", "frechet_distance",
              "kid", "diversity"):
    for split in ("test", "test_heldout"):
      value = evals[-1][f"eval/shapes_{split}/{key}"]
      assert np.isfinite(value), (split, key)
  # The untrained baseline draws blurry blobs: far from every real image, and never correct.
  assert evals[-1]["eval/shapes_test/fully_correct"] == 0.0
  # Blobs are farther from real images than as many real images are (at 6 samples in 256-d
  # the small-sample bias dominates both).
  assert (evals[-1]["eval/shapes_test/frechet_distance"]
          > evals[-1]["eval/shapes_test/frechet_distance_real"] > 0)
  grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
  assert "shapes_test_0000004.png" in grids and "shapes_test_heldout_0000004.png" in grids
  events = list((tmp_path / "tensorboard").iterdir())
  assert events and max(e.stat().st_size for e in events) > 10_000  # image summaries


class _MarkScorer:
  """Judges an image correct when it is not blank; features are its mean colour."""
  image_size, directory = 8, None

  def judge(self, images, captions):
    self.captions = list(captions)
    return [{"correct": bool(im.any()), "place": bool(im.any()), "count": True,
             "objects": {a: [bool(im.any())] for a in ("color", "shape", "size")}}
            for im in images]

  def features(self, images):
    return np.asarray(images, np.float64).reshape(len(images), -1, 3).mean(1)


def test_evaluate_images_pairs_each_split_with_its_own_samples():
  # Prompt-major samples, K = 2 per prompt: the two test prompts' samples are drawn, the
  # held-out prompt's are blank; every split must be scored on its own prompts' samples.
  prompts = [("test", "a red circle"), ("test", "a blue square"), ("test_heldout", "a cyan square")]
  images = np.zeros((6, 8, 8, 3), np.uint8)
  images[:4] = 200
  images[1, 0, 0] = 0  # two samples of a prompt differ
  scorer = _MarkScorer()
  splits, per_prompt = runner.evaluate_images(images, prompts, 2, scorer, num_real=4)
  assert scorer.captions == [c for _, c in prompts for _ in range(2)]
  assert splits["test"]["num_images"] == 4 and splits["test"]["fully_correct"] == 1.0
  assert splits["test_heldout"]["num_images"] == 2
  assert splits["test_heldout"]["fully_correct"] == 0.0
  assert splits["test"]["diversity"] > 0.0 == splits["test_heldout"]["diversity"]
  assert [p["caption"] for p in per_prompt] == [c for _, c in prompts]
  np.testing.assert_array_equal(per_prompt[2]["images"], images[4:])
  assert runner.split_rows(prompts, 2, "test_heldout") == [4, 5]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tok_path, quick_evaluator_64):
  del quick_evaluator_64  # cached before any subprocess needs it
  workdir = tmp_path_factory.mktemp("run")
  # Checkpoints at steps 2 and 4: evaluating an earlier one is tested.
  _train(_config(tok_path, **{"checkpoint.every_steps": 2}), workdir,
         Tokenizer.load(str(tok_path)))
  return workdir


def test_eval_workdir_writes_report_and_is_deterministic(tmp_path, trained_run):
  workdir = trained_run
  results = runner.evaluate_workdir(workdir, num_prompts=3, samples_per_prompt=2)
  assert set(results["splits"]) == {"test", "test_heldout"}
  for res in results["splits"].values():
    assert res["num_images"] == 6
    assert set(res["per_attribute"]) == {"color", "shape", "size", "place", "count"}
    assert res["frechet_distance"] > 0 and np.isfinite(res["kid"])
    assert res["diversity"] == pytest.approx(0.0, abs=1e-6)  # the baseline is deterministic
  saved = json.loads((workdir / "eval.json").read_text())
  assert saved["splits"] == json.loads(json.dumps(results["splits"]))
  html = (workdir / "index.html").read_text()
  assert html.count("<img ") == 12
  for _, caption in runner.eval_prompts(3):
    assert caption in html
  assert len(list((workdir / "samples").glob("0*_*.png"))) == 12
  again = runner.evaluate_workdir(workdir, num_prompts=3, samples_per_prompt=2,
                                  out_dir=tmp_path / "again")
  assert again["splits"] == results["splits"]
  with pytest.raises(ValueError, match=r"unknown shapes-v1 split 'val'; choose from \['train'"):
    runner.evaluate_workdir(workdir, num_prompts=1, splits=("test", "val"))
  with pytest.raises(ValueError, match=r"no sampling setting\(s\) \['model.guidance_scale'\]"):
    runner.evaluate_workdir(workdir, num_prompts=1, sampling={"guidance_scale": 1.0})
  # An earlier checkpoint by its step; a step not kept names those that are.
  import jax
  latest, earlier = (jax.tree.leaves(runner.load_run(workdir, step=s)[2]) for s in (None, 2))
  assert any(not np.array_equal(a, b) for a, b in zip(latest, earlier))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 \(kept: \[2, 4\]\)"):
    runner.load_run(workdir, step=3)


def test_eval_cli_on_a_workdir(tmp_path, trained_run):
  out = tmp_path / "report"
  result = subprocess.run([sys.executable, "-m", "jaxt2i", "eval", "--workdir", str(trained_run),
                           "--num_prompts", "2", "--samples_per_prompt", "1", "--out", str(out),
                           "--checkpoint_step", "2", "--splits", "train", "test_heldout"],
                          capture_output=True, text=True, timeout=280, cwd=REPO)
  assert result.returncode == 0, result.stderr
  assert "train: fully correct" in result.stdout and "test_heldout: fully correct" in result.stdout
  assert "\ntest: " not in result.stdout
  saved = json.loads((out / "eval.json").read_text())
  assert saved["step"] == 2 and list(saved["splits"]) == ["train", "test_heldout"]
  assert (out / "index.html").exists()
  missing = subprocess.run([sys.executable, "-m", "jaxt2i", "eval", "--workdir",
                            str(tmp_path / "nothing")], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
  assert missing.returncode != 0 and "no config.json" in missing.stderr
  assert "Traceback" not in missing.stderr


def test_old_config_json_loads_with_new_defaults():
  config = tiny_config()
  values = config_lib.to_json_dict(config)
  del values["eval"]  # written before the eval section existed
  del values["model"]["channels"]  # a model field added since
  values["model"]["width"] = 7  # and one the run changed
  loaded = config_lib.from_json_dict(values)
  config_lib.validate(loaded)
  assert loaded.eval.shapes_prompts == 0
  from jaxt2i.tasks.baseline import CaptionRegressionTask
  assert loaded.model.channels == CaptionRegressionTask.default_model_config().channels
  assert loaded.model.width == 7
  assert tuple(loaded.data.value_range) == tuple(config.data.value_range)
