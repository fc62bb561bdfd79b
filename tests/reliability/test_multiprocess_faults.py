"""Two processes on loopback, one SIGKILLed: the survivor leaves in bounded time naming it, and
the restarted pair resumes exactly."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker

from tests import cpu_env
from tests.reliability import fault_worker
from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax import distributed
from yocou_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_pair(tmp_path, name, kill_process, kill_at):
  port = portpicker.pick_unused_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "tests.reliability.fault_worker", str(port), str(i),
       str(tmp_path / "run"), str(tmp_path / f"{name}{i}.json"), str(kill_process),
       str(kill_at)],
      cwd=REPO, env=cpu_env.subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]


def test_survivor_exits_naming_the_lost_process_and_the_pair_resumes(tmp_path):
  survivor, victim = start_pair(tmp_path, "first", kill_process=1, kill_at=7)
  victim_out, _ = victim.communicate(timeout=600)
  died_at = time.monotonic()
  assert victim.returncode == -9 and "process 1 dies after step 7" in victim_out
  _, survivor_err = survivor.communicate(timeout=fault_worker.COLLECTIVE_TIMEOUT_S + 120)
  waited = time.monotonic() - died_at
  last_line = survivor_err.strip().splitlines()[-1]
  assert survivor.returncode == distributed.LOST_PROCESS_EXIT_CODE, survivor_err[-3000:]
  assert last_line.startswith("error: process 0 of 2 stops: a collective failed and lost "
                              "process 1 of 2 ("), last_line
  assert last_line.endswith("restart all processes to resume from the last checkpoint")
  assert waited < fault_worker.COLLECTIVE_TIMEOUT_S, waited  # Before JAX's heartbeat verdict.

  pair = start_pair(tmp_path, "second", kill_process=-1, kill_at=-1)
  for p in pair:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  resumed = [json.loads((tmp_path / f"second{i}.json").read_text())["losses"] for i in range(2)]
  assert resumed[0] == resumed[1]
  steps = sorted(int(s) for s in resumed[0])
  assert steps[-1] == 10 and steps[0] <= 8  # Resumed from a checkpoint at or before step 7.

  reference = trainer.train(tiny_config(steps=10, mesh=(2, 2, 1)), str(tmp_path / "single"),
                            data=synthetic_data(), devices=jax.devices()[:4])
  want = {r["step"]: r["loss"] for r in reference.history if "loss" in r}
  np.testing.assert_allclose([resumed[0][str(s)] for s in steps], [want[s] for s in steps],
                             rtol=0, atol=1e-5)
