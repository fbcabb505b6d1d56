"""Kill -9, SIGTERM and interrupted saves, with real processes."""

import signal
import time

import numpy as np
import pytest

from helpers import flat, read_item, start_worker, steps_saved, tokenizer_path

pytestmark = pytest.mark.timeout(240)


def wait_for(predicate, timeout, proc=None, what=""):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"worker exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def finish(proc, timeout=120):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return str(tokenizer_path(tmp_path_factory.mktemp("tok")))


def assert_same_params(workdir_a, workdir_b, step):
  _, a = read_item(workdir_a, "params", step)
  _, b = read_item(workdir_b, "params", step)
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# Three training processes (~50 s on 2 cores). The fast suite covers its parts: exact resume
# (test_trainer), kill -9 mid-save then resume and SIGTERM then resume (below).
@pytest.mark.slow
def test_kill9_then_restart_equals_straight_run(tmp_path, tok):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  rc, out = finish(start_worker([str(straight), "12", tok, "--every", "4"]))
  assert rc == 0, out
  # 16 records per step at 12 ms each: ~0.2 s per step, so the kill lands mid-run.
  proc = start_worker([str(killed), "12", tok, "--every", "4", "--delay", "0.012"])
  wait_for(lambda: 4 in steps_saved(killed), 120, proc, "the step-4 checkpoint")
  proc.send_signal(signal.SIGKILL)
  proc.wait(30)
  assert max(steps_saved(killed)) < 12, "the run finished before it was killed"
  rc, out = finish(start_worker([str(killed), "12", tok, "--every", "4"]))
  assert rc == 0 and "FINAL_STEP 12" in out, out
  assert "resuming from" in out
  assert_same_params(straight, killed, 12)
  _, ema_a = read_item(straight, "ema_params", 12)
  _, ema_b = read_item(killed, "ema_params", 12)
  for key, value in flat(ema_a).items():
    np.testing.assert_array_equal(value, flat(ema_b)[key])


def test_sigterm_saves_and_exits_zero(tmp_path, tok):
  proc = start_worker([str(tmp_path), "200", tok, "--every", "1000", "--delay", "0.01"])
  wait_for(lambda: (tmp_path / "metrics.jsonl").exists()
           and len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3, 120, proc,
           "three logged steps")
  proc.send_signal(signal.SIGTERM)
  rc, out = finish(proc, 60)
  assert rc == 0, out
  assert "preempted" in out
  saved = steps_saved(tmp_path)
  assert len(saved) == 1 and 3 <= saved[0] < 200, saved  # no periodic save was due
  # The saved step is resumable and the run goes on from it.
  rc, out = finish(start_worker([str(tmp_path), str(saved[0] + 2), tok]))
  assert rc == 0 and f"resuming from {tmp_path / 'checkpoints'} step {saved[0]}" in out, out
  assert f"FINAL_STEP {saved[0] + 2}" in out


def test_kill9_during_save_keeps_previous_checkpoint(tmp_path, tok):
  # Save every step so that a save is in flight most of the time; kill right after a save
  # has started, then check the newest finalised checkpoint restores and training resumes.
  proc = start_worker([str(tmp_path), "400", tok, "--every", "1", "--delay", "0.002"])
  wait_for(lambda: len(steps_saved(tmp_path)) >= 2, 120, proc, "two checkpoints")
  proc.send_signal(signal.SIGKILL)
  proc.wait(30)
  ckpt = tmp_path / "checkpoints"
  # A partial directory like the one a killed save leaves, whether or not the kill hit one.
  partial = ckpt / f"{max(steps_saved(tmp_path)) + 1}.orbax-checkpoint-tmp-1234"
  (partial / "params").mkdir(parents=True, exist_ok=True)
  (partial / "params" / "junk").write_bytes(b"\0" * 100)
  latest = max(steps_saved(tmp_path))
  step, params = read_item(tmp_path, "params", latest)
  assert flat(params)
  rc, out = finish(start_worker([str(tmp_path), str(latest + 2), tok, "--every", "1000"]))
  assert rc == 0 and f"step {latest}" in out and f"FINAL_STEP {latest + 2}" in out, out
  assert not partial.exists()  # interrupted saves are cleaned up at start-up
