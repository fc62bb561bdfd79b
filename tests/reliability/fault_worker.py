"""One process of a two-process run on loopback that one of them may die in (SIGKILL).

  python -m tests.reliability.fault_worker PORT PROCESS_ID WORKDIR OUT_JSON KILL_PROCESS KILL_AT

Process KILL_PROCESS kills itself with SIGKILL after step KILL_AT (-1: nobody dies). The run is
wrapped the way experiments/train.py wraps it, so a survivor leaves through
``distributed.exit_on_lost_process``.
"""

import json
import os
import signal
import sys

COLLECTIVE_TIMEOUT_S = 20


def main(port: str, process_id: str, workdir: str, out_json: str, kill_process: str,
         kill_at: str):
  from yocou_jax import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id),
                         collective_timeout_s=COLLECTIVE_TIMEOUT_S)
  import jax  # pylint: disable=g-import-not-at-top

  # pylint: disable-next=g-import-not-at-top
  from tests.train.synthetic import synthetic_data, tiny_config
  from yocou_jax.train import trainer  # pylint: disable=g-import-not-at-top

  config = tiny_config(steps=10, mesh=(2, 2, 1))
  config.train.collective_timeout_s = COLLECTIVE_TIMEOUT_S
  data = synthetic_data(process_index=jax.process_index(), process_count=jax.process_count())

  def die(step, state):
    del state
    if jax.process_index() == int(kill_process) and step == int(kill_at):
      print(f"process {jax.process_index()} dies after step {step}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  with distributed.exit_on_lost_process(COLLECTIVE_TIMEOUT_S):
    result = trainer.train(config, workdir, data=data, hooks=[die])
  with open(out_json, "w") as f:
    json.dump({"losses": {r["step"]: r["loss"] for r in result.history if "loss" in r}}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
