"""Importing the library picks the JAX platforms: no TPU runtime noise on a host without a TPU."""

import importlib.util
import json
import os
import platform
import subprocess
import sys

from tests import cpu_env
from yocou_jax import platforms

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


# A step's temporaries as XLA's CPU runtime handles them: a large block allocated, written and
# freed by a worker thread, twice. Prints GLIBC_TUNABLES and each pass's minor page faults.
_TWO_STEPS = """
import ctypes, json, os, resource, threading
from yocou_jax import platforms
platforms.restart_with_cpu_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
def steps():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    libc.memset(block, 1, SIZE)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=steps)
worker.start()
worker.join()
print(json.dumps([os.environ.get("GLIBC_TUNABLES", ""), *faults]))
"""


def test_cpu_binaries_restart_with_an_allocator_that_keeps_freed_memory():
  size = 256 << 20
  pages = size // os.sysconf("SC_PAGE_SIZE")

  def two_steps(**env):
    code = _TWO_STEPS.replace("SIZE", str(size))
    proc = subprocess.run([sys.executable, "-c", code], env=cpu_env.subprocess_env(1, **env),
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(proc.stdout)

  tunables, first, second = two_steps(GLIBC_TUNABLES="")
  if platform.libc_ver()[0] != "glibc":  # Another C library: the program runs as it is.
    assert tunables == ""
    return
  assert tunables == platforms.CPU_MALLOC_TUNABLES
  assert first > pages // 2 and second < pages // 100, (first, second, pages)
  # glibc's defaults (a user's own malloc tunable is left alone): the second pass faults again.
  tunables, first, second = two_steps(GLIBC_TUNABLES="glibc.malloc.perturb=0")
  assert tunables == "glibc.malloc.perturb=0"
  assert first > pages // 2 and second > pages // 2, (first, second, pages)
