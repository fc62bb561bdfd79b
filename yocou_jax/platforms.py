"""Which JAX backends a program initialises: no TPU runtime probing on a host without a TPU.

``import yocou_jax`` calls :func:`select` (before the program can start a backend through the
library), so the library's users and the experiments binaries alike get the quiet start below.

With libtpu installed (the ``tpu`` extra, which ahead-of-time TPU compiles on a CPU host need)
and ``JAX_PLATFORMS`` unset, JAX initialises every registered backend, and libtpu then probes the
host for a TPU and prints its initialisation errors (``Failed to find host bounds for accelerator
type``, ``=== Source Location Trace: ===``) before falling back to CPU. :func:`select` makes that
choice up front from the devices the host has: CPU alone when it has neither a TPU chip nor a
GPU; nothing changes when ``JAX_PLATFORMS`` is set or an accelerator is present (and the
setting has no effect once the backends are up). AOT TPU compiles still work:
``jax.experimental.topologies`` loads libtpu by itself whatever the platforms (``yocou_jax.aot``
runs with ``JAX_PLATFORMS=cpu``), and :func:`select` keeps that load quiet too.
"""

from __future__ import annotations

import os
import platform
import sys

import jax


def _accelerators() -> tuple[bool, bool]:
  """(a TPU chip on the PCI bus, a visible NVIDIA or AMD GPU), as JAX itself detects them."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  except ImportError:  # Another JAX layout: assume there may be both and let JAX probe.
    return True, True
  tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  return tpu_chips > 0, hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd")


def select() -> str:
  """Sets ``jax_platforms`` to ``cpu`` on a host without accelerators; returns the setting
  ("" when JAX is left to choose).

  On a host without a TPU chip it also describes the host to libtpu, should anything load it
  (AOT topologies), as one worker of its own (``TPU_WORKER_HOSTNAMES=localhost``,
  ``TPU_HOST_BOUNDS=1,1,1``; values already set are kept): libtpu otherwise prints the probing
  errors above. The topology descriptions it returns are the same either way.
  """
  tpu, gpu = _accelerators()
  if not tpu:
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  if not jax.config.jax_platforms and not tpu and not gpu:
    jax.config.update("jax_platforms", "cpu")
  return jax.config.jax_platforms or ""


# glibc's allocator for CPU training and benchmark processes: one arena, no mmap'd chunks, no
# trimming (see restart_with_cpu_malloc).
CPU_MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                       "glibc.malloc.trim_threshold=1099511627776")
_RESTARTED = "YOCOU_JAX_CPU_MALLOC"


def restart_with_cpu_malloc() -> None:
  """Re-executes this program, once, with glibc's allocator set to keep the memory it frees.

  XLA's CPU runtime allocates the temporaries of a step afresh at every execution (3.1 GiB for
  ``experiments.bench_train``'s transformer) and frees them at its end. glibc serves a block
  that large with an mmap of its own and unmaps it on free, so every step page-faults through
  all of it again while the kernel zeroes it: 830K minor faults and 1.6 s of system time a step
  on two cores. With :data:`CPU_MALLOC_TUNABLES` (one arena for all threads: a worker thread's
  arena cannot grow past 64 MiB and falls back to mmap whatever the mmap limit; no mmap'd chunks;
  no trimming) the heap keeps the block and the next step reuses it, with no faults after the
  first step. The process then holds its peak heap until it exits, a peak a training process
  reaches every step anyway. glibc reads these settings only when a process starts (mallopt(3)
  cannot set the arena limit once a second thread has allocated), hence the restart: the same
  interpreter, arguments and environment, plus ``GLIBC_TUNABLES``.

  Nothing happens where the C library is not glibc, where the host has an accelerator or
  ``JAX_PLATFORMS`` names another platform, where ``GLIBC_TUNABLES`` already sets a
  ``glibc.malloc`` tunable (the user's own choice), or in the restarted process. Call it first
  thing in a CPU binary's ``__main__`` block, before any thread starts work.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if (os.environ.get(_RESTARTED) or "glibc.malloc." in tunables
      or platform.libc_ver()[0] != "glibc"
      or (platforms and platforms != "cpu") or (not platforms and any(_accelerators()))):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, CPU_MALLOC_TUNABLES))))
  env[_RESTARTED] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
