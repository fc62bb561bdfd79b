"""The model family against explicit Python loops over its own layers, and its invariances.

``reference_forward`` rebuilds every arch from single layers (``DecoderLayer``,
``CrossDecoderLayer``, ``GlobalKV``, ``RMSNorm``) applied one by one with per-layer slices of the
stacked parameters, so it checks the scans, the weight-tied loops and the wiring of each arch.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from yocou_jax import loss as loss_lib
from yocou_jax.config import ModelConfig
from yocou_jax.layers import RMSNorm
from yocou_jax.model import CrossDecoderLayer, DecoderLayer, GlobalKV, Model

# At these tiny shapes compile time dominates: XLA:CPU's MLIR fusion emitters and LLVM's
# optimiser take most of it, so use the legacy emitters without optimisation (4-6x faster).
_COMPILER_OPTIONS = ({"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}
                     if jax.default_backend() == "cpu" else {})
BATCH, LENGTH = 2, 16
ARCHS = ("transformer", "yoco", "yocou", "rins", "looped")
# Every arch plus the variants with their own code paths.
VARIANTS = {
    "transformer": {},
    "yoco": {},
    "yocou": {},
    "rins": {},
    "looped": {},
    "yocou-T3": dict(arch="yocou", num_iterations=3),
    "yocou-T3-while_loop": dict(arch="yocou", num_iterations=3, unroll_loops=False),
    "looped-while_loop": dict(arch="looped", unroll_loops=False),
    "yoco-cross_rope": dict(arch="yoco", cross_rope=True),
    "rins-all_layers_looped": dict(arch="rins", num_recursive_layers=4),
    "transformer-tied": dict(arch="transformer", tie_embeddings=True),
}


def jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS, **kwargs)


def variant_config(tiny_config, variant: str, **overrides) -> ModelConfig:
  kwargs = {"arch": variant, **VARIANTS[variant], **overrides}
  return tiny_config(kwargs.pop("arch"), **kwargs)


@functools.lru_cache(maxsize=None)
def abstract_variables(cfg: ModelConfig):
  tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
  return jax.eval_shape(Model(cfg).init, jax.random.key(0), tokens)


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.1):
  """Normal(std) weights and 1 + Normal(0.1) norm scales, in the model's parameter tree."""
  abstract = nn.meta.unbox(abstract_variables(cfg))["params"]
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(std * noise)

  return jax.tree_util.tree_map_with_path(init, abstract)


@functools.lru_cache(maxsize=None)
def forward_fn(cfg: ModelConfig):
  model = Model(cfg)
  return jit(lambda params, tokens, seg, pos: model.apply({"params": params}, tokens, seg, pos))


def single_documents(seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (BATCH, LENGTH)).astype(np.int32)
  seg = np.ones((BATCH, LENGTH), np.int32)
  pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH))
  return tokens, seg, pos


def _layer(stacked, i):
  return jax.tree.map(lambda a: a[i], stacked)


def reference_forward(cfg: ModelConfig, params, tokens, seg, pos):
  """The arch as an explicit Python loop over single layers (float32 only)."""

  def run_stack(stack_params, x, window, times):
    stacked = stack_params["stack"]["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for _ in range(times):
      for i in range(num_layers):
        x, _ = DecoderLayer(cfg, window).apply({"params": _layer(stacked, i)}, x, seg, pos)
    return x

  x = params["embedding"][tokens]
  if cfg.arch in ("yoco", "yocou"):
    times = cfg.num_iterations if cfg.arch == "yocou" else 1
    x = run_stack(params["self_decoder"], x, cfg.window, times)
    k, v = GlobalKV(cfg).apply({"params": params["global_kv"]}, x, pos)
    stacked = params["cross_decoder"]["layers"]
    for i in range(cfg.num_layers // 2):
      x, _ = CrossDecoderLayer(cfg).apply({"params": _layer(stacked, i)}, x, k, v, seg, pos)
  elif cfg.arch == "transformer":
    x = run_stack(params["decoder"], x, None, 1)
  elif cfg.arch == "looped":
    x = run_stack(params["decoder"], x, None, cfg.num_iterations)
  elif cfg.arch == "rins":
    x = run_stack(params["recursive"], x, None, cfg.num_iterations)
    if cfg.num_recursive_layers < cfg.num_layers:
      x = run_stack(params["decoder"], x, None, 1)
  h = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
  w_DxV = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
  return h @ w_DxV


@functools.lru_cache(maxsize=None)
def reference_fn(cfg: ModelConfig):
  return jit(functools.partial(reference_forward, cfg))


@functools.lru_cache(maxsize=None)
def loss_and_grad_fn(cfg: ModelConfig):
  model = Model(cfg)

  def loss_fn(params, tokens, seg, pos):
    logits = model.apply({"params": params}, tokens, seg, pos)
    targets, weights = loss_lib.next_token_targets(tokens, seg)
    return loss_lib.cross_entropy(logits, targets, weights)[0]

  return jit(jax.value_and_grad(loss_fn))


# --- forward --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_explicit_layer_loop(tiny_config, variant):
  cfg = variant_config(tiny_config, variant)
  params = random_params(cfg)
  batch = single_documents()
  logits = forward_fn(cfg)(params, *batch)
  assert logits.shape == (BATCH, LENGTH, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  ref = reference_fn(cfg)(params, *batch)
  assert float(jnp.std(ref)) > 0.1  # The layers are not a negligible perturbation.
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_activations_give_float32_logits_close_to_float32(tiny_config, arch):
  cfg = tiny_config(arch)
  params = random_params(cfg)
  batch = single_documents()
  logits = forward_fn(cfg.replace(dtype="bfloat16"))(params, *batch)
  assert logits.shape == (BATCH, LENGTH, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  ref = np.asarray(forward_fn(cfg)(params, *batch))
  # bfloat16 rounds every activation to 8 mantissa bits (0.4%); over 4-8 layer applications the
  # logits (std about 1) drift by a few percent at most.
  np.testing.assert_allclose(np.asarray(logits), ref, atol=0.1 * ref.std(), rtol=0.05)
  assert np.abs(np.asarray(logits) - ref).mean() < 0.02 * ref.std()


def test_default_segments_are_one_document_with_positions_from_zero(tiny_config):
  cfg = tiny_config("yocou")
  params = random_params(cfg)
  tokens, seg, pos = single_documents()
  logits = jit(lambda p, t: Model(cfg).apply({"params": p}, t))(params, tokens)
  np.testing.assert_array_equal(np.asarray(logits),
                                np.asarray(forward_fn(cfg)(params, tokens, seg, pos)))


# --- yocou vs yoco ----------------------------------------------------------------------------


def test_yocou_with_one_iteration_equals_yoco(tiny_config):
  yoco = tiny_config("yoco")
  yocou = tiny_config("yocou", num_iterations=1)
  tree_yoco, tree_yocou = abstract_variables(yoco), abstract_variables(yocou)
  assert jax.tree.structure(tree_yoco) == jax.tree.structure(tree_yocou)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), tree_yoco) == jax.tree.map(
      lambda x: (x.shape, x.dtype), tree_yocou)
  assert nn.get_partition_spec(tree_yoco) == nn.get_partition_spec(tree_yocou)
  params = random_params(yoco)
  batch = single_documents()
  np.testing.assert_allclose(np.asarray(forward_fn(yocou)(params, *batch)),
                             np.asarray(forward_fn(yoco)(params, *batch)), atol=1e-6, rtol=1e-6)


def test_yocou_parameters_do_not_depend_on_iterations(tiny_config):
  trees = [abstract_variables(tiny_config("yocou", num_iterations=t)) for t in (1, 2, 5)]
  shapes = [jax.tree.map(lambda x: x.shape, t) for t in trees]
  assert shapes[0] == shapes[1] == shapes[2]
  counts = {sum(math.prod(x.shape) for x in jax.tree.leaves(t)) for t in trees}
  assert len(counts) == 1


def test_yocou_iterations_change_the_output(tiny_config):
  params = random_params(tiny_config("yocou"))
  batch = single_documents()
  two = forward_fn(tiny_config("yocou", num_iterations=2))(params, *batch)
  three = forward_fn(tiny_config("yocou", num_iterations=3))(params, *batch)
  assert np.abs(np.asarray(two) - np.asarray(three)).max() > 1e-2


def test_tied_embeddings_use_the_embedding_matrix_as_output_projection(tiny_config):
  tied = tiny_config("transformer", tie_embeddings=True)
  untied = tiny_config("transformer")
  params = random_params(tied)
  assert "lm_head" not in params
  batch = single_documents()
  with_head = {**params, "lm_head": params["embedding"].T}
  np.testing.assert_allclose(np.asarray(forward_fn(tied)(params, *batch)),
                             np.asarray(forward_fn(untied)(with_head, *batch)),
                             atol=1e-6, rtol=1e-6)


def test_cross_rope_changes_the_logits(tiny_config):
  params = random_params(tiny_config("yoco"))
  batch = single_documents()
  nope = forward_fn(tiny_config("yoco"))(params, *batch)
  rope = forward_fn(tiny_config("yoco", cross_rope=True))(params, *batch)
  assert np.abs(np.asarray(nope) - np.asarray(rope)).max() > 1e-2


# --- causality and packing --------------------------------------------------------------------


@pytest.mark.parametrize("t", [3, 10])
@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_never_change_past_logits(tiny_config, variant, t):
  cfg = variant_config(tiny_config, variant)
  params = random_params(cfg)
  tokens, seg, pos = single_documents()
  logits = np.asarray(forward_fn(cfg)(params, tokens, seg, pos))
  changed = tokens.copy()
  changed[:, t + 1:] = (changed[:, t + 1:] + 1 + np.arange(LENGTH - t - 1)) % cfg.vocab_size
  logits2 = np.asarray(forward_fn(cfg)(params, changed, seg, pos))
  np.testing.assert_array_equal(logits2[:, :t + 1], logits[:, :t + 1])
  assert np.abs(logits2[:, t + 1:] - logits[:, t + 1:]).max(axis=-1).min() > 1e-3


def packed_batch(seed: int = 1):
  """Row 0: A (9 tokens), B (5), 2 padding; row 1: B' (5), A' (9), 2 padding.

  Returns the packed (tokens, segment_ids, positions) and the documents A, A' / B, B' alone.
  """
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 64, (2, 9)).astype(np.int32)
  b = rng.integers(0, 64, (2, 5)).astype(np.int32)
  pad = np.zeros((2,), np.int32)
  tokens = np.stack([np.concatenate([a[0], b[0], pad]), np.concatenate([b[1], a[1], pad])])
  seg = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 5 + [2] * 9 + [0] * 2], np.int32)
  pos = np.array([list(range(9)) + list(range(5)) + [0, 1],
                  list(range(5)) + list(range(9)) + [0, 1]], np.int32)
  return (tokens, seg, pos), a, b


def _alone(cfg, params, docs):
  n = docs.shape[1]
  pos = np.broadcast_to(np.arange(n, dtype=np.int32), docs.shape)
  return np.asarray(forward_fn(cfg)(params, docs, np.ones_like(docs), pos))


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_row_equals_each_document_alone(tiny_config, variant):
  cfg = variant_config(tiny_config, variant)
  params = random_params(cfg)
  packed, a, b = packed_batch()
  logits = np.asarray(forward_fn(cfg)(params, *packed))
  a_alone, b_alone = _alone(cfg, params, a), _alone(cfg, params, b)
  tol = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[0, :9], a_alone[0], **tol)
  np.testing.assert_allclose(logits[0, 9:14], b_alone[0], **tol)
  np.testing.assert_allclose(logits[1, :5], b_alone[1], **tol)
  np.testing.assert_allclose(logits[1, 5:14], a_alone[1], **tol)


# --- training ---------------------------------------------------------------------------------


def assert_adamw_memorises_a_fixed_batch(cfg: ModelConfig):
  """30 AdamW steps on one batch from init_std weights: a near-uniform start, a gradient for
  every parameter, and a loss below 30% of the start (shared with test_baselines.py)."""
  params = random_params(cfg, std=cfg.init_std)
  batch = single_documents(seed=2)
  model = Model(cfg)
  optimizer = optax.adamw(1e-2)

  def loss_fn(params):
    logits = model.apply({"params": params}, *batch)
    targets, weights = loss_lib.next_token_targets(batch[0], batch[1])
    return loss_lib.cross_entropy(logits, targets, weights)[0]

  @jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = optimizer.init(params)
  losses = []
  for i in range(30):
    params, opt_state, loss, grads = step(params, opt_state)
    losses.append(float(loss))
    if i == 0:
      for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, jax.tree_util.keystr(path)  # Every parameter is used.
  # A near-uniform start: log(vocab) nats.
  assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.05
  assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_memorises_a_fixed_batch(tiny_config, arch):
  assert_adamw_memorises_a_fixed_batch(tiny_config(arch))


@pytest.mark.parametrize("overrides", [
    *(dict(remat=policy) for policy in ("full", "dots", "dots_no_batch", "offload")),
    dict(unroll_layers=True),  # The self- and cross-decoder stacks as unrolled copies.
], ids=lambda overrides: "-".join(f"{k}={v}" for k, v in overrides.items()))
def test_compile_choices_give_the_same_loss_and_gradients(tiny_config, overrides):
  """Rematerialisation policies and unrolled layer stacks: same parameters, loss, gradients."""
  cfg = tiny_config("yocou")
  params = random_params(cfg)
  batch = single_documents()
  loss, grads = loss_and_grad_fn(cfg)(params, *batch)
  loss_variant, grads_variant = loss_and_grad_fn(cfg.replace(**overrides))(params, *batch)
  np.testing.assert_allclose(float(loss_variant), float(loss), rtol=1e-6)
  for (path, g), g_variant in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(grads_variant)):
    np.testing.assert_allclose(np.asarray(g_variant), np.asarray(g), atol=1e-6, rtol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
