"""Two processes on localhost x 2 CPU devices each, talking through gloo: the pod code path."""

import json
import time

import numpy as np
import portpicker
import pytest

from helpers import flat, read_item, start_worker, steps_saved, tokenizer_path

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return str(tokenizer_path(tmp_path_factory.mktemp("tok")))


def launch(workdir, steps, tok, logs, extra=(), mesh="-1,1,1", processes=2, devices=2):
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(processes):
    args = [str(workdir), str(steps), tok, f"--mesh={mesh}",
            "--report", str(logs / f"report{pid}.json"), *extra]
    if processes > 1:
      args += ["--coordinator", f"localhost:{port}", "--num_processes", str(processes),
               "--process_id", str(pid)]
    procs.append(start_worker(args, devices=devices, log=logs / f"log{pid}.txt"))
  return procs


def wait_all(procs, logs, timeout=180):
  deadline = time.time() + timeout
  for pid, proc in enumerate(procs):
    try:
      proc.wait(max(deadline - time.time(), 1))
    except Exception:
      for p in procs:
        p.kill()
      raise AssertionError(f"process {pid} hung:\n{(logs / f'log{pid}.txt').read_text()[-3000:]}")
  return [p.returncode for p in procs]


@pytest.mark.slow  # CI time: test_resume_on_other_topologies trains and resumes on 2 processes
def test_two_processes_train_save_restore(tmp_path):
  tok_path = str(tokenizer_path(tmp_path))
  logs = tmp_path / "logs"
  logs.mkdir()
  workdir = tmp_path / "run"
  codes = wait_all(launch(workdir, 4, tok_path, logs, ("--every", "2")), logs)
  assert codes == [0, 0], [(logs / f"log{i}.txt").read_text()[-3000:] for i in range(2)]
  reports = [json.loads((logs / f"report{i}.json").read_text()) for i in range(2)]
  assert reports[0]["accessed"] and reports[1]["accessed"]
  assert steps_saved(workdir) == [2, 4]
  # Same global batch => every host logs the same (global) loss.
  assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], rel=1e-6)

  # Resume both processes from step 4 to 6; they restore and continue.
  codes = wait_all(launch(workdir, 6, tok_path, logs, ("--every", "2")), logs)
  assert codes == [0, 0], (logs / "log0.txt").read_text()[-3000:]
  assert "resuming from" in (logs / "log0.txt").read_text()
  assert 6 in steps_saved(workdir)

  # Resume across processes is exact: a straight 2-process run to step 6 is identical.
  straight = tmp_path / "straight"
  codes = wait_all(launch(straight, 6, tok_path, logs, ("--every", "3")), logs)
  assert codes == [0, 0], (logs / "log0.txt").read_text()[-3000:]
  for item in ("params", "opt_state", "ema_params"):
    _, a = read_item(workdir, item, 6)
    _, b = read_item(straight, item, 6)
    for key, value in flat(a).items():
      np.testing.assert_array_equal(value, flat(b)[key], err_msg=f"{item} {key}")


def test_killed_peer_fails_fast(tmp_path):
  tok_path = str(tokenizer_path(tmp_path))
  logs = tmp_path / "logs"
  logs.mkdir()
  procs = launch(tmp_path / "run", 100000, tok_path, logs,
                 ("--delay", "0.005", "--heartbeat", "5"))
  deadline = time.time() + 120
  while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
    assert all(p.poll() is None for p in procs), (logs / "log0.txt").read_text()[-3000:]
    time.sleep(0.1)
  procs[1].kill()
  killed_at = time.time()
  try:
    procs[0].wait(60)
  except Exception:
    procs[0].kill()
    raise AssertionError("the surviving process hung after its peer died")
  elapsed = time.time() - killed_at
  assert procs[0].returncode != 0
  assert elapsed < 30, f"took {elapsed:.1f}s to notice the dead peer"


def _losses(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {l["step"]: l["train/loss"] for l in lines if "train/loss" in l}


def test_resume_on_other_topologies_continues_the_same_run(tmp_path):
  """2 processes x 2 devices (FSDP) -> 1 process x 1 device (data parallel): the same losses
  and weights as one uninterrupted single-device run, because the data order and its
  checkpointed position do not depend on the topology. (Resharding a checkpoint across
  device counts within one process: test_trainer.test_reshard_on_restore_8_to_2_devices.)"""
  import jax
  from helpers import records
  from jaxt2i.data.tokenizer import Tokenizer
  from jaxt2i.training.trainer import Trainer
  from helpers import tiny_config

  tok_path = str(tokenizer_path(tmp_path))
  logs = tmp_path / "logs"
  logs.mkdir()
  workdir = tmp_path / "run"
  fsdp = ("--every", "2", "--strategy", "fsdp")
  legs = [(2, dict(mesh="1,-1,1", processes=2, devices=2), fsdp),
          (4, dict(mesh="-1,1,1", processes=1, devices=1), ("--every", "2"))]
  for steps, topology, extra in legs:
    procs = launch(workdir, steps, tok_path, logs, extra, **topology)
    codes = wait_all(procs, logs)
    assert set(codes) == {0}, (logs / "log0.txt").read_text()[-3000:]
  assert steps_saved(workdir) == [2, 4]

  config = tiny_config(**{"train.num_steps": 4, "checkpoint.every_steps": 100})
  trainer = Trainer(config, tmp_path / "straight", source=records(),
                    tokenizer=Tokenizer.load(tok_path), devices=jax.devices()[:1])
  trainer.train()
  resumed, straight = _losses(workdir), _losses(tmp_path / "straight")
  assert sorted(resumed) == sorted(straight) == list(range(1, 5))
  np.testing.assert_allclose([resumed[s] for s in range(1, 5)],
                             [straight[s] for s in range(1, 5)], rtol=1e-5)
  for item in ("params", "ema_params"):
    _, a = read_item(workdir, item, 4)
    _, b = read_item(tmp_path / "straight", item, 4)
    for key, value in flat(a).items():
      np.testing.assert_allclose(value, flat(b)[key], atol=1e-5, err_msg=f"{item} {key}")


def _pod_matches_single_device(tmp_path, recipe, timeout=180, **fields):
  """The recipe's fsdp_tp preset over 2 processes x 2 devices (FSDP 2 across the hosts,
  tensor 2 within each) against one device, 2 steps: same losses and weights."""
  import jax
  from helpers import recipe_config, records
  from jaxt2i.data.tokenizer import Tokenizer
  from jaxt2i.training.trainer import Trainer

  tok_path = str(tokenizer_path(tmp_path))
  logs = tmp_path / "logs"
  logs.mkdir()
  sets = [arg for key, value in fields.items() for arg in ("--set", f"{key}={value}")]
  codes = wait_all(launch(tmp_path / "pod", 2, tok_path, logs,
                          ("--recipe", f"{recipe}:tiny,fsdp_tp", "--every", "2", *sets)), logs,
                   timeout=timeout)
  assert codes == [0, 0], (logs / "log0.txt").read_text()[-3000:]
  config = recipe_config(f"{recipe}:tiny", **fields)
  trainer = Trainer(config, tmp_path / "single", source=records(size=config.data.image_size),
                    tokenizer=Tokenizer.load(tok_path), devices=jax.devices()[:1])
  trainer.train()
  pod, single = _losses(tmp_path / "pod"), _losses(tmp_path / "single")
  assert sorted(pod) == sorted(single) == [1, 2]
  np.testing.assert_allclose([pod[1], pod[2]], [single[1], single[2]], rtol=1e-5)
  _, a = read_item(tmp_path / "pod", "params", 2)
  _, b = read_item(tmp_path / "single", "params", 2)
  for key, value in flat(a).items():
    # Adam turns gradients that are zero in exact arithmetic (attention's key bias: softmax
    # ignores it) and only rounding noise in float32 into steps of up to the learning rate.
    noise_only = "['to_k']['bias']" in key
    np.testing.assert_allclose(value, flat(b)[key], err_msg=key,
                               atol=2 * config.optim.learning_rate if noise_only else 1e-5)


@pytest.mark.slow  # test_resume_on_other_topologies covers FSDP across 2 processes quickly
@pytest.mark.parametrize("recipe", [
    "clip_shapes",
    pytest.param("dvae_shapes", marks=pytest.mark.slow),
    pytest.param("autoencoder_shapes", marks=pytest.mark.slow),
])
def test_family_preset_on_two_processes_matches_one_device(tmp_path, recipe):
  _pod_matches_single_device(tmp_path, recipe)


@pytest.mark.slow  # each trains its first stage first; the U-Net compiles for minutes here
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("recipe,first_stage,field", [
    ("dalle_shapes", "dvae_shapes", "model.dvae_workdir"),
    ("ldm_shapes", "autoencoder_shapes", "model.autoencoder_workdir"),
])
def test_two_stage_family_preset_on_two_processes(tmp_path, recipe, first_stage, field):
  """The DALL-E transformer and the U-Net, with their first stage frozen."""
  from helpers import recipe_config, records, train_run
  stage = recipe_config(f"{first_stage}:tiny")
  train_run(stage, tmp_path / "first", source=records(64, stage.data.image_size))
  _pod_matches_single_device(tmp_path, recipe, timeout=900, **{field: str(tmp_path / "first")})
