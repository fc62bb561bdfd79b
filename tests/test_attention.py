"""Blocked sliding-window and chunked causal attention against an independent float64 reference.

The reference below is written from the masking rule alone (query i sees key j iff j <= i,
i - j < window and both are in the same document), in numpy float64 with K/V repeated per query
head; it shares no code with ``yocou_jax.attention``. Its ``xp=jnp`` twin gives reference
gradients.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yocou_jax import attention

# At these tiny shapes compile time dominates: XLA:CPU's MLIR fusion emitters and LLVM's
# optimiser take most of it, so use the legacy emitters without optimisation (4-6x faster).
_COMPILER_OPTIONS = ({"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}
                     if jax.default_backend() == "cpu" else {})
NUM_HEADS = 4
HEAD_DIM = 8


def reference_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, *, window=None, segment_ids_BxN=None,
                        xp=np):
  """Dense masked causal attention, K/V repeated to every query head (GQA), rows with no key -> 0."""
  b, n, h, d = q_BxNxHxD.shape
  g = h // k_BxNxKxD.shape[2]
  k_BxNxHxD = xp.repeat(k_BxNxKxD, g, axis=2)  # Query head i reads kv head i // g.
  v_BxNxHxD = xp.repeat(v_BxNxKxD, g, axis=2)
  s_BxHxNxN = xp.einsum("bnhd,bshd->bhns", q_BxNxHxD, k_BxNxHxD) / math.sqrt(d)
  i = xp.arange(n)[:, None]
  j = xp.arange(n)[None, :]
  mask_NxN = j <= i
  if window is not None:
    mask_NxN = mask_NxN & (i - j < window)
  mask_BxNxN = xp.broadcast_to(mask_NxN, (b, n, n))
  if segment_ids_BxN is not None:
    mask_BxNxN = mask_BxNxN & (segment_ids_BxN[:, :, None] == segment_ids_BxN[:, None, :])
  mask = mask_BxNxN[:, None]
  s_BxHxNxN = xp.where(mask, s_BxHxNxN, -xp.inf)
  m = xp.max(s_BxHxNxN, axis=-1, keepdims=True)
  m = xp.where(xp.isfinite(m), m, 0.0)
  p = xp.where(mask, xp.exp(s_BxHxNxN - m), 0.0)
  denom = xp.sum(p, axis=-1, keepdims=True)
  p = p / xp.where(denom == 0.0, 1.0, denom)
  return xp.einsum("bhns,bshd->bnhd", p, v_BxNxHxD)


def random_segments(rng, b, n, p_new_doc=0.2):
  """Packed rows: contiguous documents 1, 2, ... starting at random positions."""
  starts = rng.random((b, n)) < p_new_doc
  starts[:, 0] = True
  return np.cumsum(starts, axis=1).astype(np.int32)


def random_qkv(seed, n, kv_heads, b=2, dtype=np.float64):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, n, NUM_HEADS, HEAD_DIM))
  k = rng.standard_normal((b, n, kv_heads, HEAD_DIM))
  v = rng.standard_normal((b, n, kv_heads, HEAD_DIM))
  return [x.astype(dtype) for x in (q, k, v)], rng


def jit(fn):
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS)


@functools.lru_cache(maxsize=None)
def local_fn(window, block_size):
  return jit(functools.partial(attention.local_attention, window=window, block_size=block_size))


@functools.lru_cache(maxsize=None)
def causal_fn(block_size):
  return jit(functools.partial(attention.causal_attention, block_size=block_size))


@pytest.fixture
def x64():
  """float64 inside the test only."""
  with jax.enable_x64(True):
    yield


# (n, block_size, window, kv_heads, packed)
LOCAL_CASES = [
    (32, 8, 3, 4, False),  # Window smaller than the block; MHA.
    (32, 8, 8, 2, True),  # Window equal to the block; GQA 2.
    (20, 8, 64, 1, True),  # Window larger than the sequence; N not a multiple of C; GQA 4.
    (37, 16, 20, 2, True),  # N not a multiple of C, window spanning two blocks.
    (24, 8, 9, 1, False),  # W - 1 == C: exactly one previous key block.
    (24, 8, 10, 4, True),  # W - 1 == C + 1: two previous key blocks.
    (13, 32, 5, 2, True),  # Block longer than the sequence.
    (16, 1, 3, 2, True),  # Block of one token.
    (16, 4, 1, 4, True),  # Window 1: each token sees only itself.
]
LOCAL_IDS = [f"n{n}-C{c}-W{w}-K{k}-{'packed' if p else 'single'}" for n, c, w, k, p in LOCAL_CASES]

# (n, block_size, kv_heads, packed)
CAUSAL_CASES = [
    (8, 1, 2, True),  # One-token chunks.
    (19, 5, 1, True),  # N not a multiple of the chunk; GQA 4.
    (16, 8, 4, False),
    (16, 16, 2, True),  # One chunk.
    (11, 64, 2, False),  # Chunk longer than the sequence.
]
CAUSAL_IDS = [f"n{n}-C{c}-K{k}-{'packed' if p else 'single'}" for n, c, k, p in CAUSAL_CASES]


def _local_case(case, seed, dtype):
  n, block, window, kv_heads, packed = case
  (q, k, v), rng = random_qkv(seed, n, kv_heads, dtype=dtype)
  seg = random_segments(rng, q.shape[0], n) if packed else None
  return (q, k, v), seg, local_fn(window, block), dict(window=window)


def _causal_case(case, seed, dtype):
  n, block, kv_heads, packed = case
  (q, k, v), rng = random_qkv(seed, n, kv_heads, dtype=dtype)
  seg = random_segments(rng, q.shape[0], n) if packed else None
  return (q, k, v), seg, causal_fn(block), {}


def _check_against_reference(qkv, seg, fn, ref_kwargs, dtype, atol, rtol):
  q, k, v = (jnp.asarray(x, dtype) for x in qkv)
  out = fn(q, k, v, segment_ids=None if seg is None else jnp.asarray(seg))
  assert out.dtype == dtype
  assert out.shape == q.shape
  ref = reference_attention(*(np.asarray(x, np.float64) for x in (q, k, v)),
                            segment_ids_BxN=seg, **ref_kwargs)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", LOCAL_CASES, ids=LOCAL_IDS)
def test_local_attention_matches_reference_float64(case, x64):
  qkv, seg, fn, ref_kwargs = _local_case(case, seed=0, dtype=np.float64)
  _check_against_reference(qkv, seg, fn, ref_kwargs, jnp.float64, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", LOCAL_CASES, ids=LOCAL_IDS)
def test_local_attention_matches_reference_float32(case):
  qkv, seg, fn, ref_kwargs = _local_case(case, seed=1, dtype=np.float32)
  _check_against_reference(qkv, seg, fn, ref_kwargs, jnp.float32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", LOCAL_CASES[1:4], ids=LOCAL_IDS[1:4])
def test_local_attention_matches_reference_bfloat16(case):
  # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%): the probabilities and the output
  # are each rounded once, so |error| <= about 1% of max |v| (about 3 here).
  qkv, seg, fn, ref_kwargs = _local_case(case, seed=2, dtype=np.float32)
  _check_against_reference(qkv, seg, fn, ref_kwargs, jnp.bfloat16, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=CAUSAL_IDS)
def test_causal_attention_matches_reference_float64(case, x64):
  qkv, seg, fn, ref_kwargs = _causal_case(case, seed=3, dtype=np.float64)
  _check_against_reference(qkv, seg, fn, ref_kwargs, jnp.float64, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=CAUSAL_IDS)
def test_causal_attention_matches_reference_float32(case):
  qkv, seg, fn, ref_kwargs = _causal_case(case, seed=4, dtype=np.float32)
  _check_against_reference(qkv, seg, fn, ref_kwargs, jnp.float32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CAUSAL_CASES[:2], ids=CAUSAL_IDS[:2])
def test_causal_attention_matches_reference_bfloat16(case):
  qkv, seg, fn, ref_kwargs = _causal_case(case, seed=5, dtype=np.float32)
  _check_against_reference(qkv, seg, fn, ref_kwargs, jnp.bfloat16, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("q_offset,window", [(0, None), (5, None), (5, 3), (0, 4)])
def test_dense_attention_matches_reference_rows(q_offset, window, x64):
  """dense_attention's query rows [q_offset, q_offset + 6) of the full reference."""
  (q, k, v), rng = random_qkv(6, 12, 2)
  seg = random_segments(rng, 2, 12)
  rows = slice(q_offset, q_offset + 6)
  dense = jit(functools.partial(attention.dense_attention, window=window, q_offset=q_offset))
  out = dense(q[:, rows], k, v, q_segment_ids=seg[:, rows], kv_segment_ids=seg)
  ref = reference_attention(q, k, v, window=window, segment_ids_BxN=seg)[:, rows]
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-12, rtol=1e-10)


def _both_fns():
  return [("local", local_fn(5, 4)), ("causal", causal_fn(4))]


@pytest.mark.parametrize("name,fn", _both_fns(), ids=["local", "causal"])
@pytest.mark.parametrize("t", [0, 6, 13])
def test_future_tokens_never_change_past_outputs(name, fn, t):
  del name
  (q, k, v), rng = random_qkv(7, 18, 2, dtype=np.float32)
  seg = jnp.asarray(random_segments(rng, 2, 18))
  out = np.asarray(fn(q, k, v, segment_ids=seg))
  q2, k2, v2 = (x.copy() for x in (q, k, v))
  for x in (q2, k2, v2):
    x[:, t + 1:] = rng.standard_normal(x[:, t + 1:].shape) * 10
  out2 = np.asarray(fn(q2, k2, v2, segment_ids=seg))
  np.testing.assert_array_equal(out2[:, :t + 1], out[:, :t + 1])
  assert np.abs(out2[:, t + 1:] - out[:, t + 1:]).max() > 1e-2  # The perturbation is visible.


@pytest.mark.parametrize("window,block", [(1, 4), (3, 4), (4, 4), (6, 4), (9, 4)])
def test_window_is_exactly_w_keys(window, block):
  """Changing key/value p changes outputs p .. p+W-1 and no other."""
  n, p = 20, 6
  (q, k, v), rng = random_qkv(8, n, 2, dtype=np.float32)
  fn = local_fn(window, block)
  out = np.asarray(fn(q, k, v))
  k2, v2 = k.copy(), v.copy()
  k2[:, p] = rng.standard_normal(k2[:, p].shape) * 3
  v2[:, p] = rng.standard_normal(v2[:, p].shape) * 3
  out2 = np.asarray(fn(q, k2, v2))
  changed = np.abs(out2 - out).max(axis=(0, 2, 3)) > 0
  expected = (np.arange(n) >= p) & (np.arange(n) < p + window)
  np.testing.assert_array_equal(changed, expected)
  np.testing.assert_array_equal(out2[:, ~expected], out[:, ~expected])


@pytest.mark.parametrize("name,fn", _both_fns(), ids=["local", "causal"])
def test_other_documents_never_change_outputs(name, fn):
  del name
  n = 18
  seg = np.array([[1] * 5 + [2] * 6 + [3] * 7, [1] * 9 + [2] * 4 + [3] * 5], np.int32)
  (q, k, v), rng = random_qkv(9, n, 2, dtype=np.float32)
  out = np.asarray(fn(q, k, v, segment_ids=seg))
  doc2 = seg == 2
  q2, k2, v2 = (x.copy() for x in (q, k, v))
  for x in (q2, k2, v2):
    x[doc2] = rng.standard_normal(x[doc2].shape) * 10
  out2 = np.asarray(fn(q2, k2, v2, segment_ids=seg))
  np.testing.assert_array_equal(out2[~doc2], out[~doc2])
  assert np.abs(out2[doc2] - out[doc2]).min() > 0


GRAD_CASES = [
    ("local", 13, 4, 6, 2, True),  # N not a multiple of C (padded queries and keys).
    ("local", 16, 8, 3, 1, True),
    ("local", 12, 4, 20, 4, False),
    ("causal", 13, 4, None, 2, True),
    ("causal", 16, 16, None, 1, False),
]


@pytest.mark.parametrize("kind,n,block,window,kv_heads,packed", GRAD_CASES)
def test_gradients_match_reference(kind, n, block, window, kv_heads, packed, x64):
  (q, k, v), rng = random_qkv(10, n, kv_heads)
  seg = jnp.asarray(random_segments(rng, 2, n)) if packed else None
  cotangent = rng.standard_normal(q.shape)
  if kind == "local":
    fn = functools.partial(attention.local_attention, window=window, block_size=block)
  else:
    fn = functools.partial(attention.causal_attention, block_size=block)
  ref_fn = functools.partial(reference_attention, window=window, xp=jnp)

  def grads(fn, segment_kwarg):
    loss = lambda *qkv: jnp.sum(fn(*qkv, **{segment_kwarg: seg}) * cotangent)
    return jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  ours = grads(fn, "segment_ids")
  ref = grads(ref_fn, "segment_ids_BxN")
  for name, g, r in zip("qkv", ours, ref):
    assert g.dtype == jnp.float64, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-11, rtol=1e-9, err_msg=name)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  """Queries of a document that has no key (segment 7 is absent from the keys)."""
  (q, k, v), _ = random_qkv(11, 8, 2, dtype=np.float32)
  q_seg = np.array([[1, 1, 7, 7, 1, 1, 7, 1]] * 2, np.int32)
  kv_seg = np.ones((2, 8), np.int32)

  def f(q, k, v):
    return attention.dense_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

  out = np.asarray(jit(f)(q, k, v))
  masked = q_seg == 7
  np.testing.assert_array_equal(out[masked], 0.0)
  ref = reference_attention(*(x.astype(np.float64) for x in (q, k, v)))
  np.testing.assert_allclose(out[~masked], ref[~masked], atol=1e-5, rtol=1e-5)
  grads = jit(jax.grad(lambda *x: jnp.sum(f(*x) ** 2), argnums=(0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(np.asarray(grads[0])[masked], 0.0)


@pytest.mark.parametrize("window", [None, 3])
def test_self_attention_dispatches_on_window(window):
  (q, k, v), rng = random_qkv(12, 10, 2, dtype=np.float32)
  seg = random_segments(rng, 2, 10)
  out = jit(functools.partial(attention.self_attention, window=window, block_size=4))(
      q, k, v, segment_ids=seg)
  ref = reference_attention(*(x.astype(np.float64) for x in (q, k, v)), window=window,
                            segment_ids_BxN=seg)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_self_attention_rejects_unknown_impl():
  (q, k, v), _ = random_qkv(13, 4, 2, dtype=np.float32)
  with pytest.raises(ValueError, match="attention_impl='nope'"):
    attention.self_attention(q, k, v, window=None, segment_ids=None, impl="nope")


@pytest.mark.parametrize("window", [0, -4])
def test_local_attention_rejects_a_non_positive_window(window):
  (q, k, v), _ = random_qkv(14, 4, 2, dtype=np.float32)
  with pytest.raises(ValueError, match=f"window={window} must be positive"):
    attention.local_attention(q, k, v, window=window)
