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


def launch(workdir, steps, tok, logs, extra=()):
  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(2):
    args = [str(workdir), str(steps), tok, "--coordinator", f"localhost:{port}",
            "--num_processes", "2", "--process_id", str(pid), "--mesh=-1,1,1",
            "--report", str(logs / f"report{pid}.json"), *extra]
    procs.append(start_worker(args, devices=2, log=logs / f"log{pid}.txt"))
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


def test_two_processes_train_save_restore(tmp_path):
  tok_path = str(tokenizer_path(tmp_path))
  logs = tmp_path / "logs"
  logs.mkdir()
  workdir = tmp_path / "run"
  codes = wait_all(launch(workdir, 4, tok_path, logs, ("--every", "2")), logs)
  assert codes == [0, 0], [(logs / f"log{i}.txt").read_text()[-3000:] for i in range(2)]
  reports = [json.loads((logs / f"report{i}.json").read_text()) for i in range(2)]
  seen = [set(r["accessed"]) for r in reports]
  assert seen[0] and seen[1] and not seen[0] & seen[1], "hosts must read disjoint shards"
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
