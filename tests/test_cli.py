"""The `jaxt2i` command end to end: build data, train, resume; help and errors."""

import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, steps_saved, worker_env

pytestmark = pytest.mark.timeout(300)


def jaxt2i(*args, data_dir=None, devices=1, cwd=REPO):
  env = worker_env(devices)
  if data_dir:
    env["JAXT2I_DATA_DIR"] = str(data_dir)
  return subprocess.run([sys.executable, "-m", "jaxt2i", *map(str, args)], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=280)


def test_help_explains_commands():
  out = jaxt2i("--help")
  assert out.returncode == 0
  for word in ("train", "data build shapes", "data build folder", "tokenizer"):
    assert word in out.stdout
  train_help = jaxt2i("train", "--help")
  assert "--workdir" in train_help.stdout + train_help.stderr
  assert "--config" in train_help.stdout + train_help.stderr


def test_unknown_command_and_bad_overrides_are_clear(tmp_path):
  out = jaxt2i("trian")
  assert out.returncode != 0 and "unknown command 'trian'" in out.stderr
  out = jaxt2i("train", "--config", "configs/baseline_shapes.py:tiny", "--workdir", tmp_path,
               "--config.train.nmu_steps=3")
  assert out.returncode != 0 and "unknown config field 'nmu_steps'" in out.stderr
  assert "Traceback" not in out.stderr
  out = jaxt2i("train", "--config", "configs/baseline_shapes.py:tiny", "--workdir", tmp_path,
               "--config.batch_size=-8")
  assert out.returncode != 0 and "config.batch_size=-8" in out.stderr
  assert "Traceback" not in out.stderr
  # What a run needs and does not have, found once it starts: one line each.
  out = jaxt2i("train", "--config", "configs/baseline_shapes.py:tiny", "--workdir", tmp_path,
               data_dir=tmp_path / "empty")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "data set 'shapes_v1/tiny' is not built" in out.stderr
  assert "`jaxt2i data build shapes --variant tiny" in out.stderr
  out = jaxt2i("train", "--config", "configs/ldm_shapes.py:tiny", "--workdir", tmp_path / "ldm")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "jaxt2i train: config.model.autoencoder_workdir is empty" in out.stderr


def test_build_train_resume(tmp_path):
  data_dir = tmp_path / "data"
  out = jaxt2i("data", "build", "shapes", "--variant", "tiny", data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  model = tmp_path / "tok" / "captions.model"
  out = jaxt2i("data", "tokenizer", "--dataset", "shapes_v1/tiny", "--out", model,
               data_dir=data_dir)
  assert out.returncode == 0 and out.stdout.strip() == str(model), out.stderr[-3000:]
  from jaxt2i.data.tokenizer import Tokenizer
  assert Tokenizer.load(model).decode(Tokenizer.load(model).encode(
      ["a small red circle in the top left"], 16)[0]) == ["a small red circle in the top left"]
  workdir = tmp_path / "run"  # passed relative to the working directory, as users do
  # A fixed decay length: the resumed process below runs the same step program (only
  # num_steps changes), so it loads it from the compilation cache the first one wrote.
  args = ("train", "--config", REPO / "configs/baseline_shapes.py:tiny", "--workdir", "run",
          "--config.optim.decay_steps=20", "--config.train.num_steps=6",
          "--config.checkpoint.every_steps=3", "--config.train.log_every=3")
  out = jaxt2i(*args, data_dir=data_dir, devices=2, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stderr + out.stdout
  assert "step 6/6" in log and "steps/s" in log and "train step compiled" in log
  metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "train/loss" in m] == [3, 6]
  assert list((workdir / "samples").glob("*.png"))
  # Resume, then SIGTERM (preemption): a checkpoint, then exit status 143 so `&&` chains and
  # schedulers see an unfinished run.
  env = worker_env(2)
  env["JAXT2I_DATA_DIR"] = str(data_dir)
  proc = subprocess.Popen([sys.executable, "-m", "jaxt2i", *map(str, args[:-3]),
                           "--config.train.num_steps=100000", "--config.train.log_every=1"],
                          env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 200
  while '"step": 10,' not in (workdir / "metrics.jsonl").read_text() and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  log = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, log[-3000:]
  assert "resuming from" in log and "step 7/100000" in log, log[-3000:]
  assert "loaded from the compilation cache" in log, log[-3000:]
  assert "jaxt2i train: preempted at step" in log and "the same command resumes" in log
  assert "Traceback" not in log
  # A finished run: the same command stops at once, without compiling (what `make demo` does
  # to a done stage).
  saved = max(steps_saved(workdir))
  assert saved >= 10
  out = jaxt2i(*args[:-3], f"--config.train.num_steps={saved}", data_dir=data_dir, devices=2,
               cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"already trained to step {saved}" in out.stderr + out.stdout
  assert "train step compiled" not in out.stderr + out.stdout  # it only restores


def test_launch_local_dry_run():
  out = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", "-n", "3", "-d", "2", "-p", "4321", "--dry-run",
       "--", "--config", "configs/baseline_shapes.py:tiny", "--workdir", "/tmp/w"],
      cwd=REPO, capture_output=True, text=True, check=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "--xla_force_host_platform_device_count=2" in line
    assert "coordinator_address=localhost:4321" in line
    assert f"--config.distributed.process_id={i}" in line
    assert "--config.distributed.num_processes=3" in line
