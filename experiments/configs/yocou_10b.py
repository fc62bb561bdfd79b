"""A 10B-class dense YOCO-U for a v5p:4x4x4 slice: d 5120, 40 layers (20 + 20), T = 3.

Llama-2-13B-like widths at 40 layers: 40 query heads of 128 with 8 K/V heads (GQA 5:1), SwiGLU
width 13824, a 100K vocabulary, sliding window W = 512 in the self-decoder, looped T = 3 times.
``python -m experiments.plan --config=experiments/configs/yocou_10b.py`` prints 11.8B parameters
(10.8B outside the embedding and head).
Training: 8192-token rows, 4M-token steps (512 rows), bfloat16 activations with float32 params,
full rematerialisation, every chip one FSDP shard (mesh data 1, fsdp -1, tensor 1). Check that
it fits before reserving the slice::

  JAX_PLATFORMS=cpu python -m experiments.compile_for \\
      --config=experiments/configs/yocou_10b.py --topology=v5p:4x4x4
"""

import ml_collections

from experiments.configs import ladder


def get_config() -> ml_collections.ConfigDict:
  config = ladder.get_config("yocou,s6,tpu")  # Ladder training recipe, TPU mesh and kernels.
  config.model.update(num_layers=40, d_model=5120, num_heads=40, num_kv_heads=8, head_dim=128,
                      d_ff=13824, vocab_size=ladder.VOCAB_SIZE, window=512, num_iterations=3,
                      num_recursive_layers=20, dtype="bfloat16", remat="full")
  config.data.seq_len = 8192
  # 4 microbatches of 128 rows: 2 per chip on v5p:4x4x4, full remat: 34.0 GiB of temporaries,
  # 36.3 of 95 GiB per chip in all (compile_for; 8 microbatches before the loss was fused).
  config.train.update(batch_size=512, microbatches=4)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
