"""Two processes on loopback, one SIGKILLed: the survivor leaves in bounded time naming it, and
the restarted pair resumes exactly."""

import collections
import json
import os
import subprocess
import sys
import time

import portpicker

from tests import cpu_env
from tests.reliability import fault_worker
from yocou_jax import distributed

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
  assert resumed[0] == resumed[1] and sorted(map(int, resumed[0]))[-1] == 10
  # metrics.jsonl holds both runs: the steps between the checkpoint the pair resumed from and
  # the kill were computed twice, and must agree bit for bit; no step is missing.
  logged = collections.defaultdict(list)
  for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      logged[record["step"]].append(record["loss"])
  assert sorted(logged) == list(range(1, 11))
  recomputed = [s for s, losses in logged.items() if len(losses) == 2]
  assert recomputed and max(recomputed) == 7, logged  # Resumed from step 5 (or earlier).
  for step in recomputed:
    assert logged[step][0] == logged[step][1], (step, logged[step])
  for step, loss in resumed[0].items():
    assert loss == logged[int(step)][-1]
