"""Tests run on CPU with 8 fake devices, so multi-device sharding is exercised for real.

The suite is dominated by compiling many tiny programs, so XLA's CPU backend optimises them
at level 0 (compiles ~30% faster; the programs compute the same values). Shapes-v1 scoring
in the fast tests uses a quickly trained evaluator in a cache of their own
(.cache/jaxt2i-tests); the tests of the real evaluator's accuracy are `slow` and use the
shared cache (.cache/jaxt2i, the demo's).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags = f"{flags} --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
  flags = f"{flags} --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

# The real evaluators (trained once per machine, ~3 min each); the Makefile sets the same.
REAL_CACHE = os.environ.get("JAXT2I_CACHE_DIR") or os.path.join(REPO, ".cache", "jaxt2i")
# Everything the tests (and their subprocesses) cache: the quick evaluator, compilations.
os.environ["JAXT2I_CACHE_DIR"] = os.path.join(REPO, ".cache", "jaxt2i-tests")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def evaluator_64():
  """The real 64px shapes-v1 evaluator: loaded from the shared cache, trained there on first
  use (for the slow accuracy tests)."""
  from jaxt2i.eval import shapes
  return shapes.load_evaluator(64, REAL_CACHE)


@pytest.fixture(scope="session")
def quick_evaluator_64():
  """A 64px evaluator trained for 30 steps of 16 scenes into the tests' cache, where the
  scoring code finds it: it exercises every scoring path, not the real one's accuracy."""
  from jaxt2i.eval import shapes
  config = shapes.evaluator_config(64)
  config.batch_size = 16
  config.data.worker_count = 0
  config.train.num_steps = 30
  config.train.log_every = 10
  config.checkpoint.every_steps = 30
  shapes.train_evaluator(64, config=config, calibration_images=32)
  return shapes.load_evaluator(64)
