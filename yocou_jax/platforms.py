"""Which JAX backends a binary initialises: no TPU runtime probing on a host without a TPU.

With libtpu installed (the ``tpu`` extra, which ahead-of-time TPU compiles on a CPU host need)
and ``JAX_PLATFORMS`` unset, JAX initialises every registered backend, and libtpu then probes the
host for a TPU and prints its initialisation errors (``Failed to find host bounds for accelerator
type``, ``=== Source Location Trace: ===``) before falling back to CPU. :func:`select` makes that
choice up front from the devices the host has: CPU alone when it has neither a TPU chip nor a
GPU; nothing changes when ``JAX_PLATFORMS`` is set or an accelerator is present (and the
setting has no effect once the backends are up). AOT TPU compiles are unaffected:
``jax.experimental.topologies`` loads libtpu by itself whatever the platforms (``yocou_jax.aot``
runs with ``JAX_PLATFORMS=cpu``).
"""

from __future__ import annotations

import os

import jax


def _has_accelerator() -> bool:
  """A TPU chip on the PCI bus, or a visible NVIDIA or AMD GPU (as JAX itself detects them)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  except ImportError:  # Another JAX layout: assume there may be one and let JAX probe.
    return True
  tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  return tpu_chips > 0 or hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd")


def select() -> str:
  """Sets ``jax_platforms`` to ``cpu`` on a host without accelerators; returns the setting
  ("" when JAX is left to choose)."""
  if not jax.config.jax_platforms and not _has_accelerator():
    jax.config.update("jax_platforms", "cpu")
  return jax.config.jax_platforms or ""
