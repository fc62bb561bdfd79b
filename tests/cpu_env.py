"""The environment for child JAX processes started by tests (subprocess binaries, workers)."""

import os


def subprocess_env(device_count: int, **extra: str) -> dict[str, str]:
  """The environment for a test's child JAX process: this suite's flags, ``device_count`` CPUs.

  A variable given as ``""`` in ``extra`` is left unset (``JAX_PLATFORMS=""``: the binary picks
  its platforms itself).
  """
  xla_flags = " ".join(f for f in os.environ["XLA_FLAGS"].split()
                       if not f.startswith("--xla_force_host_platform_device_count"))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo,
             XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={device_count}")
  env.update(extra)
  return {k: v for k, v in env.items() if v or k not in extra}


def run_module(module: str, *args: str, device_count: int = 1, timeout: float = 900,
               **extra_env: str):
  """Runs ``python -m module args`` in a child process (its own absl flags); returns the result.

  Binaries are tested this way rather than in-process: every experiments binary defines absl
  flags at import, and two binaries in one test process would collide on names like --config.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=repo,
                        env=subprocess_env(device_count, **extra_env), capture_output=True,
                        text=True, timeout=timeout)


def run_cases(module: str, cases: list[list[str]], scratch_dir: str, device_count: int = 1,
              timeout: float = 900) -> list[dict]:
  """Runs ``module``'s main once per argument list, all in one child process.

  Returns ``[{"code": exit status, "stderr": text}]``, one per case, as separate ``python -m
  module ARGS...`` runs would end (see tests/reliability/binary_cases.py): refusals that exit at
  start-up cost one interpreter (and one import of the binary's libraries) in all.
  """
  import json  # pylint: disable=g-import-not-at-top

  cases_json = os.path.join(scratch_dir, f"{module}.cases.json")
  out_json = os.path.join(scratch_dir, f"{module}.out.json")
  with open(cases_json, "w") as f:
    json.dump(cases, f)
  proc = run_module("tests.reliability.binary_cases", module, cases_json, out_json,
                    device_count=device_count, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"tests.reliability.binary_cases {module} failed: {proc.stderr[-3000:]}")
  with open(out_json) as f:
    return json.load(f)
