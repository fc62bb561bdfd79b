"""Training metrics: JSONL + TensorBoard writers, peak FLOP/s per device, MFU, console progress."""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from yocou_jax import files
from yocou_jax.config import ConfigError

TENSORBOARD_DIR = "tensorboard"  # Under the workdir: event files and profiles (plugins/profile).
WANDB_RUN_ID_FILE = "wandb_run_id"  # Under the workdir: the run a resumed run logs into again.

# Dense bfloat16 peak FLOP/s per chip (vendor figures, no sparsity). Matched against
# ``device.device_kind`` by substring, most specific first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is lower (756e12)
    ("A100", 312e12),
)


def table_peak_flops(device: jax.Device) -> Optional[float]:
  kind = device.device_kind
  for name, peak in PEAK_FLOPS_PER_DEVICE:
    if name.lower() in kind.lower():
      return peak
  return None


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5,
                        shape: Optional[tuple[int, int, int]] = None) -> float:
  """Best achieved FLOP/s of a jitted square matmul on the default device.

  ``shape=(m, k, n)`` times an [m, k] x [k, n] matmul instead (a model's own matmul shapes).
  """
  m, k, n = shape or (size, size, size)
  a = jnp.ones((m, k), dtype)
  b = jnp.ones((k, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * m * k * n / best


@functools.lru_cache(maxsize=None)
def peak_flops_per_device(dtype=jnp.float32) -> tuple[float, str]:
  """(peak FLOP/s of one local device, where the figure comes from).

  Measured (when the device is not in the table) once per process and dtype: the device does not
  change, and a measurement costs a compile and a dozen large matmuls on every train() call.
  """
  device = jax.local_devices()[0]
  peak = table_peak_flops(device)
  if peak is not None:
    return peak, f"table: {device.device_kind} dense bf16 peak"
  measured = measure_matmul_peak(dtype=dtype)
  return measured, f"measured: {jnp.dtype(dtype).name} matmul peak on {device.device_kind}"


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to TensorBoard.

  Only process 0 writes; other processes get a writer that drops everything. ``sinks`` (objects
  with ``write(step, record)`` and ``close()``, e.g. a :class:`WandbSink`) get every record too.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               sinks: Sequence[Any] = ()):
    self.enabled = enabled
    self._tb = None
    self._sinks = list(sinks) if enabled else []
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_torn_last_line(path)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    for sink in self._sinks:
      sink.write(int(step), record)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
      for sink in self._sinks:
        sink.close()


class WandbSink:
  """Mirrors the logged records to a Weights & Biases run (``config.logging.wandb``).

  The run id is kept in ``workdir/wandb_run_id``, so a resumed run logs into the same run.
  Only numbers are logged (as in TensorBoard), at the trainer's step.
  """

  def __init__(self, wandb_config: Any, workdir: str, run_config: Mapping[str, Any]):
    import wandb  # pylint: disable=g-import-not-at-top  (optional: the `wandb` extra)

    id_path = os.path.join(workdir, WANDB_RUN_ID_FILE)
    if os.path.exists(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits.
      with files.atomic_write(id_path) as f:
        f.write(run_id + "\n")
    try:
      self.run = wandb.init(
          project=wandb_config.project, entity=wandb_config.entity, mode=wandb_config.mode,
          name=wandb_config.name or os.path.basename(os.path.abspath(workdir)),
          dir=wandb_config.dir or workdir, id=run_id, resume="allow", config=dict(run_config),
          allow_val_change=True)  # A resumed run may change what resuming allows (steps, lr).
    except Exception as e:  # pylint: disable=broad-except  (no API key, no network, ...)
      message = (str(e).strip().splitlines() or [""])[0]
      raise ConfigError(f"config.logging.wandb.mode={wandb_config.mode!r}: wandb.init failed "
                        f"({type(e).__name__}: {message})") from e

  def write(self, step: int, record: Mapping[str, Any]) -> None:
    self.run.log({k: v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float))}, step=step)

  def close(self) -> None:
    import wandb  # pylint: disable=g-import-not-at-top

    self.run.finish()
    wandb.teardown()  # The service writes the run file asynchronously: complete it now.


def tracker_sinks(config: Any, workdir: str) -> list[Any]:
  """The experiment trackers ``config.logging`` enables (process 0 builds them)."""
  if config.logging.wandb.mode == "disabled":
    return []
  return [WandbSink(config.logging.wandb, workdir, config.to_dict())]


def _to_python(v: Any) -> Any:
  if hasattr(v, "item"):
    return v.item()
  return v


def _drop_torn_last_line(path: str) -> None:
  """Cuts a last line a killed process left half-written (its step is logged again on resume)."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def read_metrics(workdir: str) -> list[dict]:
  """The logged records by step; a step logged again after a resume keeps its last record."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.endswith("\n"):  # A line without its newline is a write cut short by a kill.
        record = json.loads(line)
        by_step[record["step"]] = record
  return [by_step[step] for step in sorted(by_step)]


class Progress:
  """A one-line console display: step, loss, tokens/s, MFU and ETA."""

  def __init__(self, total_steps: int, enabled: bool = True, stream=sys.stderr):
    self.total = total_steps
    self.enabled = enabled
    self.stream = stream
    self.start_time = time.time()
    self.start_step: Optional[int] = None

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    if self.start_step is None:
      self.start_step, self.start_time = step, time.time()
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = (self.total - step) * elapsed / done if done > 0 else float("nan")
    line = (f"step {step}/{self.total} loss {metrics.get('loss', float('nan')):.4f} "
            f"{metrics.get('tokens_per_sec', 0):,.0f} tok/s "
            f"MFU {100 * metrics.get('mfu', 0):.1f}% ETA {_fmt_seconds(eta)}")
    self.stream.write("\r" + line.ljust(96))
    self.stream.flush()

  def finish(self) -> None:
    if self.enabled:
      self.stream.write("\n")
      self.stream.flush()


def _fmt_seconds(s: float) -> str:
  if s != s:  # NaN
    return "--"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
