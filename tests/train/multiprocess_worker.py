"""One process of a multi-process training run on loopback (launched by test_multiprocess.py).

  python -m tests.train.multiprocess_worker PORT NUM_PROCESSES PROCESS_ID WORKDIR OUT_JSON \
      PREEMPT_AT

Every process receives SIGTERM after step PREEMPT_AT (0: never), as a TPU pod's hosts do when
the slice is preempted.
"""

import json
import os
import signal
import sys

import jax


def main(port: str, num_processes: str, process_id: str, workdir: str, out_json: str,
         preempt_at: str):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(num_processes), process_id=int(process_id))
  from tests.train.synthetic import synthetic_data, tiny_config  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import trainer  # pylint: disable=g-import-not-at-top

  config = tiny_config(steps=10, mesh=(2, 2, 1))
  data = synthetic_data(process_index=jax.process_index(), process_count=jax.process_count())

  def preempt(step, state):
    del state
    if step == int(preempt_at):
      os.kill(os.getpid(), signal.SIGTERM)

  result = trainer.train(config, workdir, data=data, hooks=[preempt])
  with open(out_json, "w") as f:
    json.dump({"losses": [r["loss"] for r in result.history if "loss" in r],
               "eval": [r["eval_loss"] for r in result.history if "eval_loss" in r],
               "preempted": result.preempted, "devices": jax.device_count(), "local_devices": jax.local_device_count()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
