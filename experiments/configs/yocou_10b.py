"""A 10B-class dense YOCO-U for a v5p:4x4x4 slice: d 5120, 40 layers (20 + 20), T = 3.

Llama-2-13B-like widths at 40 layers: 40 query heads of 128 with 8 K/V heads (GQA 5:1), SwiGLU
width 13824, a 100K vocabulary, sliding window W = 512 in the self-decoder, looped T = 3 times.
``python -m experiments.plan --config=experiments/configs/yocou_10b.py`` prints 11.8B parameters
(10.8B outside the embedding and head).
Training: 8192-token rows, 4M-token steps (512 rows) in 2 microbatches, bfloat16 activations
with float32 params, full rematerialisation, every chip one FSDP shard (mesh data 1, fsdp -1,
tensor 1). Check that it fits before reserving the slice::

  JAX_PLATFORMS=cpu python -m experiments.compile_for \\
      --config=experiments/configs/yocou_10b.py --topology=v5p:4x4x4

Memory per chip on v5p:4x4x4 (that command with ``--config.train.microbatches=N
--config.model.remat=POLICY``; 64 chips, 512 rows a step, the fused loss):

  microbatches  rows a chip  remat    temporaries  total       HBM (95 GiB)     host memory
  4             2            full      33.93 GiB    36.21 GiB  fits (38%)       -
  4             2            dots     116.15        118.22     no (124%)        -
  4             2            offload   11.29        13.70      fits (14%)       21.88 GiB
  2             4            full      55.61        57.88      fits (61%)       -
  2             4            offload   15.70        18.11      fits (19%)       43.75 GiB
  1             8            full     103.00       105.27      no (111%)        -
  1             8            offload   22.60        25.01      fits (26%)       87.50 GiB

``dots`` saves every matmul output of the 80 layer applications (20 self-decoder layers x T = 3
and 20 cross-decoder layers): the compiler needs 116 GiB of temporaries at 2 rows a chip, so 4
and 8 rows were not compiled. Full remat keeps each application's input in HBM (6.25 GiB a row
of 8192 tokens) and its temporaries grow by 10.8 GiB a row (2 -> 4 rows: +21.7 GiB), so one
pass of 8 rows needs 105 GiB. ``offload`` keeps those inputs in pinned host memory instead
(``host_temporaries`` in the report, 1.75x the 6.25 GiB a row of inputs), which makes one pass
fit HBM at 26% but holds 87.5 GiB of host memory per chip: 350 GiB on each 4-chip v5p host of
448 GB RAM (84%, more than one NUMA node's half), with that much sent to the host and back every
step. So the config runs 2 microbatches with full remat: the fewest passes that fit with
headroom on both the chips (61% of HBM) and the hosts (nothing offloaded), the same recompute as
``offload`` without its host traffic, and half the passes of before (each pass gathers every
FSDP-sharded weight again). Hosts with the RAM to spare can run one pass with
``--config.train.microbatches=1 --config.model.remat=offload``.
"""

import ml_collections

from experiments.configs import ladder


def get_config() -> ml_collections.ConfigDict:
  config = ladder.get_config("yocou,s6,tpu")  # Ladder training recipe, TPU mesh and kernels.
  config.model.update(num_layers=40, d_model=5120, num_heads=40, num_kv_heads=8, head_dim=128,
                      d_ff=13824, vocab_size=ladder.VOCAB_SIZE, window=512, num_iterations=3,
                      num_recursive_layers=20, dtype="bfloat16", remat="full")
  config.data.seq_len = 8192
  # 2 microbatches of 256 rows, 4 per chip on v5p:4x4x4, full remat: 55.6 GiB of temporaries,
  # 57.9 of 95 GiB per chip in all (compile_for; the table above; 4 before, 8 before the loss
  # was fused). One pass fits HBM only with remat=offload, at 87.5 GiB of host memory a chip.
  config.train.update(batch_size=512, microbatches=2)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
