"""Importing the library picks the JAX platforms: no TPU runtime noise on a host without a TPU."""

import importlib.util
import subprocess
import sys

from tests import cpu_env

# What libtpu prints when it probes a host without a TPU (jax.devices() with JAX_PLATFORMS unset).
NOISE = ("Failed to find host bounds", "Source Location Trace", "TPU_WORKER_HOSTNAMES")


def _devices_in_child(code: str) -> subprocess.CompletedProcess:
  """``code`` then ``print(jax.devices())`` in a child with JAX_PLATFORMS and the TPU host
  variables unset (this process's ``import yocou_jax`` set the latter), as a user runs it."""
  env = cpu_env.subprocess_env(1, JAX_PLATFORMS="", TPU_WORKER_HOSTNAMES="", TPU_HOST_BOUNDS="")
  return subprocess.run([sys.executable, "-c", f"{code}; print(jax.devices())"], env=env,
                        capture_output=True, text=True, timeout=120, check=True)


def test_importing_the_library_starts_jax_quietly_on_cpu():
  proc = _devices_in_child("import yocou_jax, jax")
  assert proc.stdout.strip() == "[CpuDevice(id=0)]", proc.stdout
  for noise in NOISE:
    assert noise not in proc.stderr, proc.stderr
  if importlib.util.find_spec("libtpu") is not None:  # The noise it removes, without the library.
    bare = _devices_in_child("import jax")
    assert bare.stdout.strip() == "[CpuDevice(id=0)]", bare.stdout
    assert all(noise in bare.stderr for noise in NOISE[:2]), bare.stderr
