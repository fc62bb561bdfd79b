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
