"""Next-token cross-entropy over packed rows, in float32, with optional z-loss.

Two ways to the same numbers:

* :func:`cross_entropy` from materialised logits ``[B, N, V]`` (small vocabularies, tests);
* :func:`fused_cross_entropy` from the final features ``[B, N, D]`` and the output projection
  ``[D, V]``: the projection and the softmax run over chunks of ``chunk_size`` positions of every
  row (a ``lax.scan``), so no more than one chunk's logits ``[B, C, V]`` exists at a time, and a
  custom VJP recomputes each chunk's logits in the backward pass instead of saving them. Memory
  for the loss drops from O(B N V) to O(B C V); the FLOPs grow by one output projection.

Both reduce per-token cross-entropies and log-partition functions with the same weights and
z-loss (:func:`reduce_losses`). The vocabulary is not chunked: it is sharded over the ``tensor``
mesh axis like the projection, and the logsumexp across shards is one small all-reduce per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from yocou_jax.layers import activation

Array = jax.Array
# Positions of every row per loss chunk on accelerators ([rows, C, V] float32 logits a chunk);
# on CPU the whole row is one chunk (the vocabularies trained there are small).
ACCELERATOR_CHUNK_SIZE = 256
SCOPE = "fused_cross_entropy"  # Name scope of the fused loss's ops (profiles, HLO dumps).


def next_token_targets(tokens_BxN: Array, segment_ids_BxN: Array) -> tuple[Array, Array]:
  """Targets ``tokens[t+1]`` and weights that are 1 where t+1 is in the same (non-padding) document.

  The last token of every document (and of the row) has no target and weight 0.
  """
  targets = jnp.concatenate([tokens_BxN[:, 1:], jnp.zeros_like(tokens_BxN[:, :1])], axis=1)
  next_seg = jnp.concatenate([segment_ids_BxN[:, 1:], jnp.zeros_like(segment_ids_BxN[:, :1])],
                             axis=1)
  weights = (segment_ids_BxN > 0) & (next_seg == segment_ids_BxN)
  return targets, weights.astype(jnp.float32)


def reduce_losses(ce_BxN: Array, log_z_BxN: Array, weights_BxN: Array,
                  z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Mean weighted cross-entropy (+ z_loss * mean log(Z)^2); also returns sums for logging.

  Returns ``(loss, aux)`` where aux holds ``loss_sum`` (cross-entropy only), ``z_loss_sum`` and
  ``num_tokens``, so that gradient-accumulation and evaluation can average exactly over tokens.
  """
  num_tokens = jnp.sum(weights_BxN)
  ce_sum = jnp.sum(ce_BxN * weights_BxN)
  z_sum = jnp.sum(jnp.square(log_z_BxN) * weights_BxN)
  denom = jnp.maximum(num_tokens, 1.0)
  loss = (ce_sum + z_loss * z_sum) / denom
  return loss, {"loss_sum": ce_sum, "z_loss_sum": z_sum, "num_tokens": num_tokens}


def cross_entropy(logits_BxNxV: Array, targets_BxN: Array, weights_BxN: Array,
                  z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """:func:`reduce_losses` of materialised logits."""
  logits = logits_BxNxV.astype(jnp.float32)
  ce_BxN = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxN)
  log_z_BxN = jax.nn.logsumexp(logits, axis=-1)
  return reduce_losses(ce_BxN, log_z_BxN, weights_BxN, z_loss)


def fused_cross_entropy(h_BxNxD: Array, w_DxV: Array, targets_BxN: Array, weights_BxN: Array,
                        z_loss: float = 0.0, chunk_size: int = 0) -> tuple[Array, dict[str, Array]]:
  """:func:`cross_entropy` of the logits ``h @ w`` without materialising them (see module doc).

  Args:
    h_BxNxD: final-normed features, in the compute dtype.
    w_DxV: output projection, in the compute dtype.
    targets_BxN, weights_BxN, z_loss: as for :func:`cross_entropy`.
    chunk_size: positions of every row per chunk; 0: :func:`default_chunk_size`.
  """
  ce_BxN, log_z_BxN = token_cross_entropy(h_BxNxD, w_DxV, targets_BxN, chunk_size)
  return reduce_losses(ce_BxN, log_z_BxN, weights_BxN, z_loss)


def default_chunk_size() -> int:
  """:data:`ACCELERATOR_CHUNK_SIZE` on TPU/GPU; 0 (the whole row) on CPU.

  Asks the kernels' backend resolution, so that an ahead-of-time compile for a TPU on a CPU
  host (``aot.target_kernels``) gets the TPU default.
  """
  from kernels import ops  # pylint: disable=g-import-not-at-top

  _, interpret = ops.default_kernel()
  return 0 if interpret else ACCELERATOR_CHUNK_SIZE


def token_cross_entropy(h_BxNxD: Array, w_DxV: Array, targets_BxN: Array,
                        chunk_size: int = 0) -> tuple[Array, Array]:
  """Per-token ``(cross-entropy, log Z)`` of the logits ``h @ w``, float32, chunked over positions.

  Differentiable in ``h`` and ``w``; the backward pass recomputes each chunk's logits.
  """
  n = h_BxNxD.shape[1]
  chunk = resolve_chunk_size(chunk_size, n)
  pad = -n % chunk
  with jax.named_scope(SCOPE):
    if pad:  # Zero features and target 0 on the padded positions; their outputs are dropped.
      h_BxNxD = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
      targets_BxN = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
    ce_BxN, log_z_BxN = _token_cross_entropy(h_BxNxD, w_DxV, targets_BxN, chunk)
  return ce_BxN[:, :n], log_z_BxN[:, :n]


def token_logprobs(h_BxNxD: Array, w_DxV: Array, targets_BxN: Array,
                   chunk_size: int = 0) -> tuple[Array, Array]:
  """Per-token ``(log p(target), target is the argmax)`` of ``h @ w``, chunked (no gradient)."""
  n = h_BxNxD.shape[1]
  chunk = resolve_chunk_size(chunk_size, n)
  pad = -n % chunk
  h_BxNxD = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
  targets_BxN = jnp.pad(targets_BxN, ((0, 0), (0, pad)))
  log_z, target_logit, max_logit = _chunked_stats(h_BxNxD, w_DxV, targets_BxN, chunk)
  return (target_logit - log_z)[:, :n], (target_logit >= max_logit)[:, :n]


def resolve_chunk_size(chunk_size: int, seq_len: int) -> int:
  """Positions per chunk for rows of ``seq_len``: 0 picks the backend default; at most a row."""
  if chunk_size < 0:
    raise ValueError(f"loss chunk size {chunk_size} is invalid: must be >= 0 (0: per backend)")
  chunk = chunk_size or default_chunk_size() or seq_len
  return min(chunk, seq_len)


# --- the chunked computation ------------------------------------------------------------------

def _to_chunks(x_BxN: Array, chunk: int) -> Array:
  """[B, N, ...] -> [N / C, B, C, ...]: the scanned axis first, rows (the sharded axis) kept."""
  b, n = x_BxN.shape[:2]
  return jnp.moveaxis(x_BxN.reshape(b, n // chunk, chunk, *x_BxN.shape[2:]), 1, 0)


def _from_chunks(x_KxBxC: Array) -> Array:
  return jnp.moveaxis(x_KxBxC, 0, 1).reshape(x_KxBxC.shape[1], -1)


def _gathered(w_DxV: Array) -> Array:
  """The projection whole along D (FSDP all-gathers it once per pass, outside the chunk loop).

  Left sharded, the partitioner gathers it inside the loop, once per chunk, as a windowed
  matmul whose partial sums keep two more float32 chunks of logits alive.
  """
  return activation(w_DxV, None, "activation_vocab")


def _chunk_logits(h_BxCxD: Array, w_DxV: Array) -> Array:
  h_BxCxD = activation(h_BxCxD, "activation_batch", "activation_length", "activation_embed")
  logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  return activation(logits, "activation_batch", "activation_length", "activation_vocab")


def _is_target(logits_BxCxV: Array, targets_BxC: Array) -> Array:
  """One-hot of the targets as a comparison with an iota (partitions over a sharded vocab)."""
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, 2)
  return vocab == targets_BxC[..., None]


def _chunked_stats(h_BxNxD: Array, w_DxV: Array, targets_BxN: Array, chunk: int):
  """(log Z, target logit, max logit) per token, [B, N] float32 each; N a multiple of chunk."""
  w_DxV = _gathered(w_DxV)

  def body(_, xs):
    h_BxCxD, targets_BxC = xs
    logits = _chunk_logits(h_BxCxD, w_DxV)
    max_BxC = jnp.max(logits, axis=-1)
    log_z = max_BxC + jnp.log(jnp.sum(jnp.exp(logits - max_BxC[..., None]), axis=-1))
    target = jnp.sum(jnp.where(_is_target(logits, targets_BxC), logits, 0.0), axis=-1)
    return None, (log_z, target, max_BxC)

  _, stats = jax.lax.scan(body, None, (_to_chunks(h_BxNxD, chunk), _to_chunks(targets_BxN, chunk)))
  return tuple(_from_chunks(s) for s in stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_cross_entropy(h_BxNxD, w_DxV, targets_BxN, chunk):
  log_z, target, _ = _chunked_stats(h_BxNxD, w_DxV, targets_BxN, chunk)
  return log_z - target, log_z


def _token_cross_entropy_fwd(h_BxNxD, w_DxV, targets_BxN, chunk):
  log_z, target, _ = _chunked_stats(h_BxNxD, w_DxV, targets_BxN, chunk)
  return (log_z - target, log_z), (h_BxNxD, w_DxV, targets_BxN, log_z)


def _token_cross_entropy_bwd(chunk, residuals, cotangents):
  """d logits = (g_ce + g_logz) * softmax - g_ce * onehot(target), one chunk at a time."""
  h_BxNxD, w_DxV, targets_BxN, log_z_BxN = residuals
  g_ce_BxN, g_log_z_BxN = cotangents
  w_DxV = _gathered(w_DxV)

  def body(dw_DxV, xs):
    h_BxCxD, targets_BxC, log_z_BxC, g_ce, g_log_z = xs
    logits = _chunk_logits(h_BxCxD, w_DxV)
    probs = jnp.exp(logits - log_z_BxC[..., None])
    d_logits = ((g_ce + g_log_z)[..., None] * probs
                - jnp.where(_is_target(logits, targets_BxC), g_ce[..., None], 0.0))
    d_logits = activation(d_logits.astype(h_BxCxD.dtype), "activation_batch",
                          "activation_length", "activation_vocab")
    dh_BxCxD = jnp.einsum("bcv,dv->bcd", d_logits, w_DxV, preferred_element_type=jnp.float32)
    dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", h_BxCxD, d_logits,
                                 preferred_element_type=jnp.float32)
    return dw_DxV, dh_BxCxD.astype(h_BxCxD.dtype)

  xs = tuple(_to_chunks(x, chunk) for x in (h_BxNxD, targets_BxN, log_z_BxN, g_ce_BxN,
                                             g_log_z_BxN))
  with jax.named_scope(SCOPE):
    dw_DxV = activation(jnp.zeros(w_DxV.shape, jnp.float32), None, "activation_vocab")
    dw_DxV, dh_KxBxCxD = jax.lax.scan(body, dw_DxV, xs)
  dh_BxNxD = jnp.moveaxis(dh_KxBxCxD, 0, 1).reshape(h_BxNxD.shape)
  return dh_BxNxD, dw_DxV.astype(w_DxV.dtype), None


_token_cross_entropy.defvjp(_token_cross_entropy_fwd, _token_cross_entropy_bwd)
