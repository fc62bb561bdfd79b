"""Two JAX processes on loopback (gloo collectives) train exactly like one process.

The two processes are preempted (SIGTERM) after step 5; one process then resumes their
checkpoint, so the run also crosses process counts.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker

from tests import cpu_env
from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_processes_match_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  env = cpu_env.subprocess_env(2)
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.train.multiprocess_worker", str(port), "2", str(i),
           str(tmp_path / "run"), str(tmp_path / f"out{i}.json"), "5"],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-3000:]
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert [r["devices"] for r in results] == [4, 4]
  assert [r["local_devices"] for r in results] == [2, 2]

  assert all(r["preempted"] for r in results)
  assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == 5

  config = tiny_config(steps=10, mesh=(2, 2, 1))
  reference = trainer.train(config, str(tmp_path / "single"), data=synthetic_data(),
                            devices=jax.devices()[:4])
  resumed = trainer.train(config, str(tmp_path / "run"), data=synthetic_data(),
                          devices=jax.devices()[:4])
  ref_losses = [r["loss"] for r in reference.history if "loss" in r]
  ref_eval = [r["eval_loss"] for r in reference.history if "eval_loss" in r]
  got_losses = results[0]["losses"] + [r["loss"] for r in resumed.history if "loss" in r]
  got_eval = results[0]["eval"] + [r["eval_loss"] for r in resumed.history if "eval_loss" in r]
  np.testing.assert_allclose(got_losses, ref_losses, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got_eval, ref_eval, rtol=0, atol=1e-5)
