"""Joining a multi-process run, and leaving it in bounded time when another process dies.

A process that dies mid-run takes its collectives down with it. Two things bound how long the
survivors wait: a peer whose connection closes fails the next collective at once, and JAX's
coordination service declares a process dead once it missed heartbeats for
``config.train.collective_timeout_s`` (then every survivor is terminated with a log line naming
the dead task). ``exit_on_lost_process`` turns the first case into one line naming the lost
processes (a roll call through the coordination service's key-value store) and an exit within
half that timeout, instead of a traceback and a shutdown barrier that would wait for the dead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator, Optional

import jax

LOST_PROCESS_EXIT_CODE = 75  # EX_TEMPFAIL: restart every process to resume.
_ROLL_CALL = "yocou_jax/roll_call"


def initialize(coordinator_address: Optional[str], num_processes: Optional[int],
               process_id: Optional[int], *, collective_timeout_s: int) -> None:
  """``jax.distributed.initialize`` with gloo collectives on CPU and a heartbeat timeout."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs need it.
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=int(collective_timeout_s))


def lost_processes(wait_s: float) -> Optional[list[int]]:
  """The processes that did not answer a roll call within ``wait_s``; None: no coordinator.

  Every survivor of a failed collective writes its key to the coordination service's key-value
  store and waits for the others' keys. This answers in ``wait_s``, well before the heartbeat
  timeout (after which JAX terminates the survivors itself), and needs no answer from the dead.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:
    return None
  me, count = jax.process_index(), jax.process_count()
  answer = []

  def roll_call():
    try:
      client.key_value_set(f"{_ROLL_CALL}/{me}", "alive")
      deadline = time.monotonic() + wait_s
      missing = [p for p in range(count) if p != me]
      while missing and time.monotonic() < deadline:
        missing = [p for p in missing if not _has_key(client, f"{_ROLL_CALL}/{p}")]
        time.sleep(0.1)
      answer.append(missing)
    except Exception:  # pylint: disable=broad-except  (the coordinator is unreachable)
      pass

  thread = threading.Thread(target=roll_call, daemon=True)
  thread.start()
  thread.join(wait_s + 5.0)
  return answer[0] if answer else None


def _has_key(client, key: str) -> bool:
  try:
    return client.key_value_try_get(key) is not None
  except Exception as e:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(e).upper().replace(" ", "_"):
      return False
    raise  # The coordinator is gone: the roll call has no answer.


def describe_lost(error: BaseException, wait_s: float) -> str:
  """One line: which processes were lost (or that the coordinator was), and the error."""
  lost = lost_processes(wait_s)
  me, count = jax.process_index(), jax.process_count()
  if lost is None:
    who = "the coordinator (process 0) is unreachable" if me else "the other processes are unknown"
  elif lost:
    who = f"lost process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))} of {count}"
  else:
    who = "no process is reported lost"
  first = (str(error).strip().splitlines() or [""])[0][:200]
  return (f"error: process {me} of {count} stops: a collective failed and {who} "
          f"({type(error).__name__}: {first}); restart all processes to resume from the last "
          "checkpoint")


@contextlib.contextmanager
def exit_on_lost_process(collective_timeout_s: float) -> Iterator[None]:
  """In a multi-process run, a failed collective exits with one line naming the lost processes.

  The roll call waits half of ``collective_timeout_s`` (the survivors fail their collectives at
  about the same moment). Leaves with ``os._exit``: a normal exit would run the distributed
  shutdown barrier, which waits for the dead process (up to the shutdown timeout).
  """
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    sys.stdout.flush()
    print(describe_lost(e, collective_timeout_s / 2), file=sys.stderr, flush=True)
    os._exit(LOST_PROCESS_EXIT_CODE)  # pylint: disable=protected-access
