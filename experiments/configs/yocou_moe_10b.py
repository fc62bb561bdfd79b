"""The paper's main model: an MoE YOCO-U, 64 routed experts top-8 plus 1 shared, ~10B / ~1.3B active.

20 layers (10 self-decoder layers looped T = 3, 10 cross-decoder layers), every FFN an MoE,
d 2560, 20 query heads of 128 with 4 K/V heads, window W = 512, a 100K vocabulary, 8192-token
rows, 4M-token steps, AdamW (0.9, 0.95), lr 1e-3.

How the widths were chosen. The paper reports 10B total and 1.3B activated parameters (and
d = 2560); per MoE layer the routed experts hold 3 d F E parameters of which a token uses
3 d F K, the shared expert 3 d F (all used), the router d E. With E / K = 8 the routed weights
alone have total / active = 8, and the shared expert, the attention (~0.29B) and the embedding
and head (~0.51B) count in both, so total / active < 65 / 9 = 7.2 < 10 / 1.3: no expert width
matches both figures at d 2560 (nor at any d). F = 768 gives 8.5B / 1.36B (active without the
embedding and head), F = 896 gives 9.8B / 1.53B. F = 832 (6.5 x 128, a TPU-friendly width)
sits between, about 10% under the total and 10% over the active figure:
``python -m experiments.plan --config=experiments/configs/yocou_moe_10b.py`` prints 9.1B total
and 1.96B active (1.44B without the 0.51B embedding and head).

Sharding. Both modes compile for v5p:4x4x4 (mesh data 1, fsdp 64, tensor 1; at 8 microbatches,
64 rows of 8192 tokens a microbatch; the experts' grouped matmul is megablox, ``moe_matmul=auto``
on TPU)::

  JAX_PLATFORMS=cpu python -m experiments.compile_for \\
      --config=experiments/configs/yocou_moe_10b.py --topology=v5p:4x4x4 \\
      [--config.model.expert_sharding=expert]

* ``expert`` (expert parallelism; the 64 experts split over ``fsdp``, one per chip, tokens
  reaching them by the ring of experts): fits in 29.6 GiB of the 95 GiB per chip (parameters
  0.53, Adam 1.06, temporaries 27.7 GiB). XLA's FLOPs are 3.95x the analytic count on its
  basis: each chip's grouped matmul is compiled for the ring's worst case, N x min(K, local
  experts) rows (every gathered token on the local expert), while a balanced router sends it
  N x K / E x local experts.
* ``fsdp`` (expert weights sharded like any weight, gathered per layer; the default here): fits
  in 13.1 GiB per chip (parameters 0.53, Adam 1.06, temporaries 11.1 GiB), and XLA's FLOPs are
  0.997x the analytic count (each chip runs its own tokens' K experts: exactly the active work).

The paper-scale run should use ``fsdp``: less than half the memory, no worst-case compute, and
less traffic. Per MoE application and chip, ``fsdp`` all-gathers the layer's expert weights,
3 x 64 x 2560 x 832 x 2 bytes = 0.82 GB in bfloat16 (and reduce-scatters their float32
gradient, 1.6 GB), whatever the batch. The ring of experts all-gathers the whole
microbatch's tokens instead, 524,288 x 2560 x 2 bytes = 2.7 GB, and reduce-scatters the float32
outputs, 5.4 GB: about 3x the traffic of ``fsdp`` at this batch, plus matmuls compiled for the
worst case. The ring wins only when tokens per microbatch x D is small against the experts'
weights (small batches, or many more experts per chip); an all-to-all dispatch (tokens sent to
their K experts' chips only, 8x less than the ring's gather at K = 8 on 64 chips) would change
that, but ``ragged_all_to_all`` cannot be tested on CPU.

With the fused loss (``loss_chunk_size``), 4 microbatches (128 rows a microbatch, 2 per chip) fit
too: with ``expert`` sharding the train step took 46.5 GiB per chip (parameters 0.53, Adam 1.06,
temporaries 44.5 GiB; XLA's FLOPs 3.57x analytic, the ring's worst case) against 28.7 GiB at 8
microbatches. ``fsdp`` holds fewer temporaries than ``expert`` at equal microbatches (above), so
the config trains with ``fsdp`` and 4 microbatches.
"""

import ml_collections

from experiments.configs import ladder


def get_config() -> ml_collections.ConfigDict:
  config = ladder.get_config("yocou,s5,tpu")  # Ladder training recipe, TPU mesh and kernels.
  config.model.update(num_layers=20, d_model=2560, num_heads=20, num_kv_heads=4, head_dim=128,
                      vocab_size=ladder.VOCAB_SIZE, window=512, num_iterations=3,
                      dtype="bfloat16", remat="full", ffn="moe", num_experts=64,
                      num_experts_per_token=8, num_shared_experts=1, expert_d_ff=832,
                      router_aux_loss=0.01, router_z_loss=1e-3, capacity_factor=0.0,
                      expert_sharding="fsdp")
  config.data.seq_len = 8192
  config.train.update(batch_size=512, microbatches=4)  # 128 rows a pass: 2 per chip on v5p:4x4x4.
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
