"""Device mesh and logical-axis sharding rules (T5X style).

Parameters and activations are annotated with *logical* axis names in the model; this table maps
them onto the three mesh axes:

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
* ``tensor``: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

With ``expert_sharding="expert"`` the MoE expert dimension (logical ``expert``) takes the ``fsdp``
axis (expert parallelism, see yocou_jax/moe.py).

A logical name mapped to ``None`` is replicated. A dimension that the mapped mesh axes do not
divide is an error at start-up (see :func:`check_divisible`), not a silent replication.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from yocou_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("expert", "fsdp"),  # MoE expert parallelism (expert_sharding="expert"): experts over fsdp.
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_length", None),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int,
                       name: str = "config.mesh") -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes from config; at most one may be -1, meaning "the rest".

  ``name`` is what errors call the sizes (``config.mesh``, or a binary's flag).
  """
  shape = [int(sizes[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  for axis, s in zip(MESH_AXES, shape):
    if s == 0 or s < -1:
      raise ConfigError(f"{name}.{axis}={s} is invalid: must be a positive size or -1")
  if len(free) > 1:
    raise ConfigError(f"{name} has -1 for {[MESH_AXES[i] for i in free]}: at most one axis "
                     "may be -1")
  known = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % known:
      raise ConfigError(f"{name} sizes {dict(zip(MESH_AXES, shape))} do not divide the "
                       f"{num_devices} devices")
    shape[free[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"{name} sizes {dict(zip(MESH_AXES, shape))} multiply to "
                     f"{math.prod(shape)}, not the {num_devices} devices")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              name: str = "config.mesh") -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (GSPMD propagation of logical shardings)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices), name)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """The context every jitted model call traces under: ``jax.set_mesh`` and the logical rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_sharding(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (boxed, logically-partitioned) tree such as ``jax.eval_shape(init)``."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(model: nn.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES,
                    seq_len: int = 1) -> Any:
  """NamedShardings of ``model``'s params on ``mesh`` by their logical names, from shapes only
  (``model.init`` on ``[1, seq_len]`` tokens under ``jax.eval_shape``); a one-line error names
  the first dimension its mesh axes do not divide."""
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, seq_len), "int32"))["params"])
  shardings = logical_sharding(boxed, mesh, rules)
  check_divisible(boxed, shardings)
  return shardings


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
  """Raises a one-line error for the first array dimension its mesh axes do not divide."""
  is_boxed = lambda x: isinstance(x, nn.Partitioned)  # pylint: disable=unnecessary-lambda-assignment
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_boxed(x) else x,
                        abstract_tree, is_leaf=is_boxed)
  flat, _ = jax.tree_util.tree_flatten_with_path(values)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      size = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % size:
        name = jax.tree_util.keystr(path)
        raise ConfigError(f"{name} dimension {dim} is not divisible by mesh axes {axes} "
                         f"(size {size}); change the mesh or the model sizes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [batch, length] inputs: batch over every data-parallel axis."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
