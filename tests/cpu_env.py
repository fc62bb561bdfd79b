"""The environment for child JAX processes started by tests (subprocess binaries, workers)."""

import os


def subprocess_env(device_count: int, **extra: str) -> dict[str, str]:
  """The environment for a test's child JAX process: this suite's flags, ``device_count`` CPUs."""
  xla_flags = " ".join(f for f in os.environ["XLA_FLAGS"].split()
                       if not f.startswith("--xla_force_host_platform_device_count"))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo, **extra,
              XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={device_count}")
