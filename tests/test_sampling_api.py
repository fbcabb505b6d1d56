"""`jaxt2i.load(workdir)` and `jaxt2i sample`: the Python sampling API over trained runs."""

import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

import jaxt2i
from helpers import REPO, records, tiny_config, tokenizer_path
from jaxt2i.data.tokenizer import Tokenizer
from jaxt2i.training.trainer import Trainer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
  tok_path = tokenizer_path(tmp_path_factory.mktemp("tok"))
  workdir = tmp_path_factory.mktemp("run")
  trainer = Trainer(tiny_config(**{"data.tokenizer": str(tok_path)}), workdir,
                    source=records(64, 32), tokenizer=Tokenizer.load(str(tok_path)))
  try:
    trainer.train()
  finally:
    trainer.writer.close()
    trainer.checkpointer.close()
  return workdir


def test_load_and_sample(baseline_run):
  pipe = jaxt2i.load(baseline_run)
  prompts = ["a small red circle in the top left", "a large blue square at the bottom"]
  images = pipe(prompts, num_images_per_prompt=2, seed=0)
  assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
  assert images[0].size == (32, 32)
  arrays = pipe(prompts, num_images_per_prompt=2, seed=0, output="np")
  assert arrays.shape == (4, 32, 32, 3) and arrays.dtype == np.uint8
  np.testing.assert_array_equal(arrays[0], np.asarray(images[0]))
  # The baseline is deterministic: both samples of a prompt agree, prompts differ.
  np.testing.assert_array_equal(arrays[0], arrays[1])
  assert not np.array_equal(arrays[0], arrays[2])
  # 4 rows over the 8 devices of the data axis: padded, then trimmed.
  assert pipe.mesh.shape["data"] == jax.device_count()


def test_prompts_and_errors(baseline_run):
  pipe = jaxt2i.load(baseline_run)
  long = "a small red circle in the top left " * 6
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pipe([long], output="np")
  assert any("truncated" in str(w.message) for w in caught)
  assert pipe([""], output="np").shape == (1, 32, 32, 3)  # unconditional
  with pytest.raises(ValueError, match="output must be"):
    pipe(["a small red circle in the top left"], output="tensor")
  with pytest.raises(ValueError, match="at least one prompt"):
    pipe([])
  with pytest.raises(FileNotFoundError, match="no config.json"):
    jaxt2i.load(baseline_run / "missing")


def test_sample_cli(baseline_run, tmp_path):
  out = tmp_path / "grid.png"
  result = subprocess.run(
      [sys.executable, "-m", "jaxt2i", "sample", "--workdir", str(baseline_run), "--prompt",
       "a small red circle in the top left", "--prompt", "a large blue square at the bottom",
       "--num_images", "3", "--out", str(out)],
      capture_output=True, text=True, timeout=280, cwd=REPO)
  assert result.returncode == 0, result.stderr
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 32 + 2, 3 * 32 + 4, 3)
