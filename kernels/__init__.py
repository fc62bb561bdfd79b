"""Pallas kernels for local-window and cross attention (with pure-JAX references beside them).

The model reaches them through ``config.model.attention_impl`` (``yocou_jax.attention.
self_attention``): ``pallas`` (these kernels), ``cudnn`` (GPU), ``auto`` (pallas on TPU and GPU,
xla on CPU), ``xla`` (no kernels). On a CPU backend ``pallas`` runs the TPU kernels in Pallas
interpret mode, which is how the tests exercise the real kernel code.

Modules:

* ``ops``: the public API. ``local_attention`` (sliding window, the self-decoder),
  ``cross_attention`` (causal over the shared K/V, the cross-decoder), ``flash_attention``
  (both), ``decode_attention`` (a few query tokens against a K/V cache), ``cudnn_attention``;
  padding, GQA, ``jax.custom_vjp`` and ``jax.shard_map`` under the trainer's mesh.
* ``local_attention``: TPU (Mosaic) flash attention over a causal band, forward, dq and dk/dv
  kernels; the grid visits only the key blocks a query block's window reaches (O(N * W)).
* ``cross_attention``: the cross-decoder's use of that kernel and the split-K decode kernel.
* ``gpu``: the same kernels for GPU in Pallas-Triton, and the cuDNN fallback.
* ``blocks``: the block geometry (``Band``) shared by all kernels.
* ``reference``: dense pure-JAX references (``attention_reference``, ``decode_reference``).
* ``tpu_compile_check``: ahead-of-time Mosaic compile for a TPU topology without TPUs.

Masks are index based: query i sees key j iff ``j <= i``, ``i - j < window`` and the segment
ids are equal; a query with no visible key gets zeros, never NaN.
"""
