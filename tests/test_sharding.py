"""Mesh construction and the logical-axis rules on 8 fake CPU devices (see conftest.py).

The expected placement of every parameter is derived here from its name and the rule table of the
design (vocab, mlp and heads over ``tensor``, embed over ``fsdp``, stacked-layer and head_dim
dims and norms replicated), independently of ``yocou_jax.sharding``.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from yocou_jax import sharding
from yocou_jax.model import Model

_COMPILER_OPTIONS = ({"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}
                     if jax.default_backend() == "cpu" else {})
BATCH, LENGTH = 4, 16
MESH_SIZES = {"data": 2, "fsdp": 2, "tensor": 2}

# Logical axes of each parameter, by the last names of its path; leading extra dims are the
# stacked 'layers' dim.
PARAM_AXES = {
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "scale": ("norm",),
    "query/kernel": ("embed", "q_heads", "head_dim"),
    "key/kernel": ("embed", "kv_heads", "head_dim"),
    "value/kernel": ("embed", "kv_heads", "head_dim"),
    "out/kernel": ("q_heads", "head_dim", "embed"),
    "gate/kernel": ("embed", "mlp"),
    "up/kernel": ("embed", "mlp"),
    "down/kernel": ("mlp", "embed"),
}
MESH_AXIS_OF = {"vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "q_heads": "tensor",
                "kv_heads": "tensor", "head_dim": None, "norm": None, "layers": None}


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS, **kwargs)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(MESH_SIZES, devices=jax.devices("cpu")[:8])


def _path_names(path):
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def expected_spec(path, ndim):
  names = _path_names(path)
  for suffix, axes in PARAM_AXES.items():
    parts = suffix.split("/")
    if names[-len(parts):] == parts:
      logical = ("layers",) * (ndim - len(axes)) + axes
      return tuple(MESH_AXIS_OF[a] for a in logical)
  raise AssertionError(f"no expected axes for parameter {'/'.join(names)}")


def _padded(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


def packed_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (BATCH, LENGTH)).astype(np.int32)
  starts = rng.random((BATCH, LENGTH)) < 0.2
  starts[:, 0] = True
  seg = np.cumsum(starts, axis=1).astype(np.int32)
  pos = np.zeros_like(seg)
  for b in range(BATCH):
    for i in range(1, LENGTH):
      pos[b, i] = 0 if starts[b, i] else pos[b, i - 1] + 1
  return tokens, seg, pos


@functools.lru_cache(maxsize=None)
def sharded_init(cfg, mesh):
  model = Model(cfg)
  init = functools.partial(model.init, tokens_BxN=jnp.zeros((BATCH, LENGTH), jnp.int32))
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_sharding(abstract, mesh)
  sharding.check_divisible(abstract, shardings)
  return jit(init, out_shardings=shardings)(jax.random.key(0))


ARCH_CASES = pytest.mark.parametrize(
    "arch,overrides", [("yocou", {}), ("transformer", {"tie_embeddings": True}), ("rins", {})],
    ids=["yocou", "transformer-tied", "rins"])


@ARCH_CASES
def test_init_places_every_parameter_by_the_rule_table(tiny_config, mesh, arch, overrides):
  cfg = tiny_config(arch, **overrides)
  variables = nn.meta.unbox(sharded_init(cfg, mesh))
  leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
  assert len(leaves) > 10
  for path, x in leaves:
    name = jax.tree_util.keystr(path)
    spec = expected_spec(path, x.ndim)
    assert _padded(x.sharding.spec, x.ndim) == spec, name
    shard_shape = tuple(d // (MESH_SIZES[a] if a else 1) for d, a in zip(x.shape, spec))
    assert len(x.addressable_shards) == 8, name
    for shard in x.addressable_shards:
      assert shard.data.shape == shard_shape, name


def test_embedding_splits_vocab_over_tensor_and_embed_over_fsdp(tiny_config, mesh):
  cfg = tiny_config("yocou")
  params = nn.meta.unbox(sharded_init(cfg, mesh))["params"]
  emb = params["embedding"]
  assert _padded(emb.sharding.spec, 2) == ("tensor", "fsdp")
  assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.d_model // 2)
  # Stacked layers keep their leading 'layers' dim whole.
  query = params["self_decoder"]["stack"]["layers"]["attn"]["query"]["kernel"]
  assert query.addressable_shards[0].data.shape == (
      cfg.num_layers // 2, cfg.d_model // 2, cfg.num_heads // 2, cfg.head_dim)
  scale = params["cross_decoder"]["layers"]["mlp_norm"]["scale"]
  assert scale.sharding.is_fully_replicated


@ARCH_CASES
def test_sharded_forward_equals_single_device_forward(tiny_config, mesh, arch, overrides):
  cfg = tiny_config(arch, **overrides)
  model = Model(cfg)
  variables = sharded_init(cfg, mesh)
  tokens, seg, pos = packed_batch()
  apply = lambda v, *batch: model.apply(v, *batch)
  with sharding.activate(mesh):
    batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in (tokens, seg, pos)]
    logits = jit(apply)(variables, *batch)
  assert logits.shape == (BATCH, LENGTH, cfg.vocab_size)
  assert len(logits.devices()) == 8
  host_params = jax.tree.map(np.asarray, nn.meta.unbox(variables))
  single_device = jax.devices("cpu")[0]
  host_params, batch = jax.device_put((host_params, (tokens, seg, pos)), single_device)
  ref = jit(apply)(host_params, *batch)
  assert len(ref.devices()) == 1
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=1e-5)


# --- check_divisible ---------------------------------------------------------------------------


def _abstract_and_shardings(cfg, mesh):
  abstract = jax.eval_shape(
      functools.partial(Model(cfg).init, tokens_BxN=jnp.zeros((BATCH, LENGTH), jnp.int32)),
      jax.random.key(0))
  return abstract, sharding.logical_sharding(abstract, mesh)


def test_check_divisible_rejects_heads_the_tensor_axis_does_not_divide(tiny_config, mesh):
  cfg = tiny_config("transformer", d_model=48, num_heads=3, num_kv_heads=3, head_dim=16)
  abstract, shardings = _abstract_and_shardings(cfg, mesh)
  with pytest.raises(ValueError, match=r"dimension 3 is not divisible by mesh axes "
                                       r"\('tensor',\) \(size 2\)") as err:
    sharding.check_divisible(abstract, shardings)
  assert "\n" not in str(err.value)
  assert "kernel" in str(err.value)


def test_check_divisible_rejects_vocab_the_tensor_axis_does_not_divide(tiny_config, mesh):
  abstract, shardings = _abstract_and_shardings(tiny_config("transformer", vocab_size=63), mesh)
  with pytest.raises(ValueError, match=r"embedding.*dimension 63 is not divisible"):
    sharding.check_divisible(abstract, shardings)


def test_check_divisible_accepts_divisible_sizes(tiny_config, mesh):
  abstract, shardings = _abstract_and_shardings(tiny_config("yocou"), mesh)
  sharding.check_divisible(abstract, shardings)  # Must not raise.
  assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(nn.meta.unbox(abstract)))


# --- meshes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes,devices,expected", [
    ({"data": -1, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 1, "fsdp": -1, "tensor": 1}, 8, (1, 8, 1)),
    ({"data": 2, "fsdp": 1, "tensor": -1}, 8, (2, 1, 4)),
    ({"data": 4, "fsdp": 1, "tensor": 2}, 8, (4, 1, 2)),
    ({"data": -1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
])
def test_resolve_mesh_shape_fills_the_free_axis(sizes, devices, expected):
  assert sharding.resolve_mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes,match", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, r"config\.mesh sizes .* multiply to 4, not the 8"),
    ({"data": 4, "fsdp": 4, "tensor": 1}, r"config\.mesh sizes .* multiply to 16, not the 8"),
    ({"data": -1, "fsdp": -1, "tensor": 2}, r"config\.mesh has -1 for \['data', 'fsdp'\]"),
    ({"data": 8, "fsdp": 0, "tensor": 1}, r"config\.mesh\.fsdp=0 is invalid"),
    ({"data": 8, "fsdp": 1, "tensor": -2}, r"config\.mesh\.tensor=-2 is invalid"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, r"config\.mesh sizes .* do not divide the 8 devices"),
])
def test_resolve_mesh_shape_rejects_bad_sizes(sizes, match):
  with pytest.raises(ValueError, match=match) as err:
    sharding.resolve_mesh_shape(sizes, 8)
  assert "\n" not in str(err.value)


def test_make_mesh_has_named_auto_axes(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == (2, 2, 2)
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert len(set(mesh.devices.flat)) == 8


def test_batch_is_split_over_data_and_fsdp(mesh):
  s = sharding.batch_sharding(mesh)
  assert s.spec == PartitionSpec(("data", "fsdp"), None)
  x = jax.device_put(np.zeros((BATCH, LENGTH), np.int32), s)
  assert {shard.data.shape for shard in x.addressable_shards} == {(BATCH // 4, LENGTH)}
  assert math.prod(s.mesh.shape.values()) == 8
