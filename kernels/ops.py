"""Public attention ops: padding, backend choice, custom VJP and shard_map around the kernels.

Entry points (model layout: ``q [B, N, H, D]``, ``k, v [B, N, K, D]``, H a multiple of K):

* :func:`local_attention` (sliding window W: query i sees keys i-W+1..i) and
  :func:`cross_attention` (causal over the shared K/V of the cross-decoder), both through
  :func:`flash_attention`: differentiable (``jax.custom_vjp`` whose backward runs the dq and
  dk/dv kernels from the saved logsumexp), GQA, segment ids, optional logit soft-cap. Lengths
  that are not a block multiple are padded inside and masked by causality.
* :func:`decode_attention`: a few query tokens at absolute positions against a K/V cache
  (:mod:`kernels.cross_attention`), forward only; :func:`cache_attention` is the same kernel
  with the signature of the inference engine's cache-attention hook.
* :func:`cudnn_attention`: ``jax.nn.dot_product_attention(implementation="cudnn")``.
* :func:`self_attention`: the dispatch used by ``yocou_jax.attention.self_attention`` for
  ``attention_impl`` in ``pallas | cudnn | auto``.

Backends (``kernel=None`` picks by ``jax.default_backend()``):

* TPU: ``pallas`` runs the Mosaic kernels (``local_attention.py``); ``auto`` picks pallas.
* GPU: ``pallas`` runs the Triton kernels (``gpu.py``); ``auto`` picks pallas (cudnn when the
  jax install has no Pallas-Triton).
* CPU: ``pallas`` runs the TPU kernels with ``interpret=True``; ``auto`` picks xla.

Under a mesh (``jax.set_mesh``, as the trainer does) the kernels run inside ``jax.shard_map``:
batch split as ``activation_batch`` and heads as ``activation_heads`` in the active flax
logical-axis rules (replicated when a mesh axis does not divide the dimension), because
Pallas calls cannot be partitioned automatically.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
from jax.sharding import PartitionSpec as P

from kernels import blocks
from kernels import cross_attention as cross_attention_lib
from kernels import gpu
from kernels import local_attention as local_attention_lib

Array = jax.Array

# Default (forward q, forward kv, backward q, backward kv) blocks per kernel family.
DEFAULT_BLOCKS = {
    "tpu": (512, 512, 512, 512),
    "triton": (128, 64, 64, 64),
    "interpret": (128, 128, 128, 128),
}
DECODE_BLOCK_KV = {"tpu": 512, "triton": 64, "interpret": 128}
_BACKENDS = {"tpu": local_attention_lib, "triton": gpu}


def default_kernel() -> tuple[str, Any]:
  """(kernel family, interpret) for the default JAX backend; CPU interprets the TPU kernels."""
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu", False
  if platform in ("gpu", "cuda", "rocm"):
    return "triton", False
  return "tpu", True


def triton_available() -> bool:
  try:
    from jax.experimental.pallas import triton as _  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def resolve_impl(impl: str) -> str:
  """``auto`` -> the best implementation on this backend; other names pass through."""
  if impl != "auto":
    return impl
  platform = jax.default_backend()
  if platform == "tpu":
    return "pallas"
  if platform in ("gpu", "cuda"):
    return "pallas" if triton_available() else "cudnn"
  return "xla"


# ----------------------------------------------------------------------------------------------
# Differentiable flash attention.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, segment_ids, kv_segment_ids, cfg: blocks.FlashConfig):
  return _BACKENDS[cfg.kernel].forward(q, k, v, segment_ids, kv_segment_ids, cfg)[0]


def _flash_fwd(q, k, v, segment_ids, kv_segment_ids, cfg: blocks.FlashConfig):
  return _BACKENDS[cfg.kernel].forward(q, k, v, segment_ids, kv_segment_ids, cfg)


def _flash_bwd(cfg: blocks.FlashConfig, residuals, do):
  dq, dk, dv = _BACKENDS[cfg.kernel].backward(cfg, residuals, do)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_shapes(q: Array, k: Array, v: Array, *segment_ids: Optional[Array]) -> None:
  b, n, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
    raise ValueError(f"expected k, v [B={b}, N={n}, K, D={d}], got {k.shape}, {v.shape}")
  if h % k.shape[2]:
    raise ValueError(f"query heads {h} are not a multiple of kv heads {k.shape[2]}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  for ids in segment_ids:
    if ids is not None and ids.shape != (b, n):
      raise ValueError(f"segment ids must be [B={b}, N={n}], got {ids.shape}")


def flash_attention(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *,
                    window: Optional[int] = None, segment_ids: Optional[Array] = None,
                    kv_segment_ids: Optional[Array] = None, softcap: Optional[float] = None,
                    block_q: Optional[int] = None,
                    block_kv: Optional[int] = None, block_q_bwd: Optional[int] = None,
                    block_kv_bwd: Optional[int] = None, kernel: Optional[str] = None,
                    interpret: Any = None) -> Array:
  """Causal attention, sliding-window when ``window`` is set, through the Pallas kernels.

  Args:
    q_BxNxHxD, k_BxNxKxD, v_BxNxKxD: queries, keys, values (same dtype; H = G * K).
    window: W keys per query (itself and W-1 before), or None for full causal.
    segment_ids: [B, N] ints; attention stays within equal ids (packed documents).
    kv_segment_ids: [B, N] key segment ids when they differ from the queries' (default: the
      same); a query whose segment has no visible key gets a zero output.
    softcap: optional logit soft-cap ``c * tanh(s / c)``.
    block_q, block_kv, block_q_bwd, block_kv_bwd: tile sizes (defaults per backend:
      ``DEFAULT_BLOCKS``); clipped to the sequence and aligned for the hardware.
    kernel: "tpu" (Mosaic) or "triton" (GPU); default from the JAX backend.
    interpret: False, True or ``pltpu.InterpretParams(...)``; default True on CPU.

  Returns:
    [B, N, H, D] in the dtype of q. Rows with no visible key are 0.
  """
  _check_shapes(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, segment_ids, kv_segment_ids)
  if segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids needs segment_ids for the queries")
  if window is not None and window <= 0:
    raise ValueError(f"window={window} must be positive")
  auto_kernel, auto_interpret = default_kernel()
  kernel = kernel or auto_kernel
  if kernel not in _BACKENDS:
    raise ValueError(f"kernel={kernel!r}; allowed: {sorted(_BACKENDS)}")
  interpret = auto_interpret if interpret is None else interpret
  defaults = DEFAULT_BLOCKS["interpret" if interpret else kernel]
  sizes = [x or y for x, y in zip((block_q, block_kv, block_q_bwd, block_kv_bwd), defaults)]
  cfg = blocks.FlashConfig(window=window, softcap=softcap, block_q=sizes[0], block_kv=sizes[1],
                           block_q_bwd=sizes[2], block_kv_bwd=sizes[3], kernel=kernel,
                           interpret=interpret)
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  return _shard_over_mesh(functools.partial(_flash, cfg=cfg), q_BxNxHxD, k_BxNxKxD, v_BxNxKxD,
                          segment_ids, kv_segment_ids)


def local_attention(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *, window: int,
                    segment_ids: Optional[Array] = None, **kwargs) -> Array:
  """Sliding-window causal attention (the self-decoder's): see :func:`flash_attention`."""
  return flash_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, window=window,
                         segment_ids=segment_ids, **kwargs)


def cross_attention(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *,
                    segment_ids: Optional[Array] = None, **kwargs) -> Array:
  """The cross-decoder's causal attention over the shared K/V: see :func:`flash_attention`."""
  return flash_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, window=None,
                         segment_ids=segment_ids, **kwargs)


def cudnn_attention(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *,
                    window: Optional[int] = None, segment_ids: Optional[Array] = None) -> Array:
  """cuDNN flash attention (GPU, bfloat16/float16): the fallback and speed reference."""
  _check_shapes(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, segment_ids)
  return gpu.cudnn_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, window=window,
                             segment_ids_BxN=segment_ids)


def decode_attention(q_BxTxHxD: Array, k_cache: Array, v_cache: Array, *,
                     q_positions_BxT: Array, kv_length_B: Optional[Array] = None,
                     window: Optional[int] = None, softcap: Optional[float] = None,
                     block_kv: Optional[int] = None, num_splits: int = 16,
                     cache_layout: str = "BSKD", kernel: Optional[str] = None,
                     interpret: Any = None) -> Array:
  """T query tokens at absolute positions against a K/V cache (flash-decoding); [B, T, H, D].

  Query t sees cache entries ``j <= q_positions[b, t]``, ``j < kv_length[b]`` and, with a
  window, ``q_positions[b, t] - j < window``. The cache is ``[B, S, K, D]`` or, with
  ``cache_layout="BKSD"``, ``[B, K, S, D]``. Chunks of the cache outside every query's range
  (past ``kv_length``, before the window) are neither computed nor, on TPU, read. See
  :mod:`kernels.cross_attention`; the reference is :func:`kernels.reference.decode_reference`.
  Forward only (inference).
  """
  auto_kernel, auto_interpret = default_kernel()
  kernel = kernel or auto_kernel
  interpret = auto_interpret if interpret is None else interpret
  block_kv = block_kv or DECODE_BLOCK_KV["interpret" if interpret else kernel]
  return cross_attention_lib.decode_attention(
      q_BxTxHxD, k_cache, v_cache, q_positions_BxT=q_positions_BxT,
      kv_length_B=kv_length_B, window=window, softcap=softcap, block_kv=block_kv,
      num_splits=num_splits, cache_layout=cache_layout, kernel=kernel, interpret=interpret)


def cache_attention(q_BxCxHxD: Array, positions_BxC: Array, k_BxKxSxD: Array, v_BxKxSxD: Array,
                    *, block_size: int) -> Array:
  """The decode kernel with the signature of ``yocou_jax.inference.attention.
  xla_cache_attention`` (causal: key j visible to a query at position p when j <= p; caches
  ``[B, K, S, D]``): ``yocou_jax.inference.attention.cache_attention`` with a ``pallas`` impl.

  ``block_size`` (the XLA path's key block) is not used: the kernel's blocks are per backend.
  Under a multi-device mesh it runs per shard (batch and heads split as the activations).
  """
  del block_size

  def attend(q, positions, k, v):
    return decode_attention(q, k, v, q_positions_BxT=positions, cache_layout="BKSD")

  return shard_cache_op(attend, q_BxCxHxD, positions_BxC, k_BxKxSxD, v_BxKxSxD)


def shard_cache_op(fn, q_BxCxHxD: Array, positions_BxC: Array, k_BxKxSxD: Array,
                   v_BxKxSxD: Array) -> Array:
  """Runs ``fn(q, positions, k, v) -> [B, C, H, D]`` (a kernel on ``[B, K, S, D]`` caches) per
  shard under a multi-device mesh: batch as ``activation_batch``, heads as ``activation_heads``
  (q's H and the cache's K split alike, so each shard keeps whole query groups)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return fn(q_BxCxHxD, positions_BxC, k_BxKxSxD, v_BxKxSxD)
  batch = _mesh_axes(mesh, "activation_batch", q_BxCxHxD.shape[0])
  heads = _mesh_axes(mesh, "activation_heads", k_BxKxSxD.shape[1])
  q_spec, cache_spec = P(batch, None, heads, None), P(batch, heads, None, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, P(batch, None), cache_spec, cache_spec),
                       out_specs=q_spec, check_vma=False)(q_BxCxHxD, positions_BxC, k_BxKxSxD,
                                                          v_BxKxSxD)


def self_attention(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *,
                   window: Optional[int], segment_ids: Optional[Array], impl: str,
                   block_size: Optional[int] = None) -> Array:
  """``attention_impl`` dispatch for ``pallas`` and ``cudnn`` (``auto`` resolved by the caller).

  ``block_size`` (``config.model.attention_block_size``) sets the forward blocks and caps the
  backward ones; None keeps the per-backend defaults.
  """
  if impl == "cudnn":
    return cudnn_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, window=window,
                           segment_ids=segment_ids)
  if impl != "pallas":
    raise ValueError(f"impl={impl!r} is not a kernel implementation")
  sizes = {}
  if block_size is not None:
    kernel, interpret = default_kernel()
    bwd_q, bwd_kv = DEFAULT_BLOCKS["interpret" if interpret else kernel][2:]
    if kernel == "triton":  # Triton tiles are powers of two.
      block_size = 1 << (block_size.bit_length() - 1)
    sizes = dict(block_q=block_size, block_kv=block_size, block_q_bwd=min(bwd_q, block_size),
                 block_kv_bwd=min(bwd_kv, block_size))
  return flash_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, window=window,
                         segment_ids=segment_ids, **sizes)


# ----------------------------------------------------------------------------------------------
# shard_map under the trainer's mesh.


def _mesh_axes(mesh, logical: str, size: int):
  """Mesh axes for a logical activation axis, or None when they do not divide ``size``."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  # Only under a mesh.
  axes = nn.logical_to_mesh_axes((logical,))[0]
  if axes is None:
    return None
  names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
  if not names or size % math.prod(mesh.shape[a] for a in names):
    return None
  return names


def _shard_over_mesh(fn, q: Array, k: Array, v: Array, q_seg: Optional[Array],
                     kv_seg: Optional[Array]) -> Array:
  """Runs ``fn(q, k, v, q_seg, kv_seg)`` per shard when a multi-device mesh is active."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return fn(q, k, v, q_seg, kv_seg)
  batch = _mesh_axes(mesh, "activation_batch", q.shape[0])
  heads = _mesh_axes(mesh, "activation_heads", k.shape[2])  # K divides H.
  spec = P(batch, None, heads, None)
  if q_seg is None:
    per_shard = lambda q, k, v: fn(q, k, v, None, None)  # pylint: disable=unnecessary-lambda-assignment
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q, k, v)
  seg_spec = P(batch, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3 + (seg_spec,) * 2, out_specs=spec,
                       check_vma=False)(q, k, v, q_seg, kv_seg)
