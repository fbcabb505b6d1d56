"""The cluster launchers (launch/): their dry-run output, and the commands they would run
executed against stand-in `srun` / `python3` programs, arguments with spaces included."""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jaxt2i.parallel import mesh as mesh_lib

REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--config", "configs/ldm_shapes.py:reference", "--workdir", "gs://bucket/my run"]


def _script(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def _run(args, env=None, check=True):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})}, check=check)


def test_tpu_vm_dry_run():
  out = _run(["bash", "launch/tpu_vm.sh", "create", "setup", "train", "logs", "stop", "delete",
              "--name", "slice", "--zone", "us-central2-b", "--accelerator", "v4-32",
              "--spot", "--dry-run", "--", *TRAIN_ARGS]).stdout.splitlines()
  assert len(out) == 8, out
  commands = [shlex.split(line) for line in out]
  create, wheel, scp, install, train, logs, stop, delete = commands
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"slice", "--zone=us-central2-b", "--accelerator-type=v4-32", "--spot"} <= set(create)
  assert wheel[:4] == ["python3", "-m", "pip", "wheel"] and wheel[-1] == str(REPO)
  assert scp[4] == "scp" and str(REPO / "configs") in scp and "--worker=all" in scp
  assert "--worker=all" in install and "[tpu]" in install[-1]
  # The remote command keeps each train argument whole and adds cluster detection.
  assert train[4] == "ssh" and "--worker=all" in train
  remote = shlex.split(train[train.index("--command") + 1])
  assert remote[:4] == ["nohup", "python3", "-m", "jaxt2i"]
  assert remote[4:9] == ["train", *TRAIN_ARGS]
  assert remote[9] == "--config.distributed.mode=cluster"
  assert "--worker=0" in logs and stop[stop.index("--command") + 1].startswith("pkill -TERM")
  assert delete[4] == "delete" and "--quiet" in delete


def test_tpu_vm_errors():
  bad = _run(["bash", "launch/tpu_vm.sh", "create", "--bogus"], check=False)
  assert bad.returncode == 2 and "unknown action or option '--bogus'" in bad.stderr
  bad = _run(["bash", "launch/tpu_vm.sh", "train", "--dry-run"], check=False)
  assert bad.returncode == 2 and "train needs jaxt2i train arguments" in bad.stderr
  bad = _run(["bash", "launch/tpu_vm.sh"], check=False)
  assert bad.returncode == 2 and "name at least one action" in bad.stderr


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_runs_train_on_every_task(tmp_path, per_gpu):
  """The sbatch script run outside SLURM with a stand-in srun (which runs the task command
  with SLURM_LOCALID=3) and a stand-in python that reports its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
          "SLURM_LOCALID=3 exec \"$@\"\n")
  python = _script(tmp_path / "python", f"#!{sys.executable}\nimport json, sys\n"
                   "print('ARGV', json.dumps(sys.argv[1:]))\n")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python),
         "PER_GPU": "1" if per_gpu else "0"}
  out = _run(["bash", "launch/slurm_gpu.sbatch", *TRAIN_ARGS], env=env).stdout
  argv = json.loads(next(line for line in out.splitlines() if line.startswith("ARGV"))[5:])
  expected = ["-m", "jaxt2i", "train", *TRAIN_ARGS, "--config.distributed.mode=cluster"]
  if per_gpu:
    expected.append("--config.distributed.local_device_ids=3")
  assert argv == expected
  dry = _run(["bash", "launch/slurm_gpu.sbatch", *TRAIN_ARGS], env={**env, "DRY_RUN": "1"})
  assert shlex.split(dry.stdout)[0] == "srun" and "ARGV" not in dry.stdout
  missing = _run(["bash", "launch/slurm_gpu.sbatch"], env=env, check=False)
  assert missing.returncode == 2 and "give jaxt2i train arguments" in missing.stderr


def test_distributed_settings():
  assert mesh_lib.local_device_ids({"local_device_ids": "0, 2"}) == [0, 2]
  assert mesh_lib.local_device_ids({"local_device_ids": (1,)}) == [1]
  assert mesh_lib.local_device_ids({"local_device_ids": ""}) is None
  assert mesh_lib.local_device_ids({}) is None
  with pytest.raises(ValueError, match="local_device_ids='gpu0'"):
    mesh_lib.local_device_ids({"local_device_ids": "gpu0"})
  with pytest.raises(ValueError, match="'cluster'"):
    mesh_lib.initialize_distributed({"mode": "slurm"})
