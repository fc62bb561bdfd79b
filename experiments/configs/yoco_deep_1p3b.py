"""The paper's "deeper instead of wider" ablation (Table 5): YOCO with 40 layers at d 1792.

YOCO-U (``yocou_1p3b.py``: 20 layers at d 2048, T = 3) runs 10 self-decoder layers three times
plus 10 cross-decoder layers: 40 layer applications per token at width 2048 with the parameters
of 20 layers. The ablation spends that depth on *distinct* layers instead: a plain (T = 1) YOCO
of 40 layers (20 self- + 20 cross-decoder), narrower (d 1792 = 14 heads of 128; 2 K/V heads,
the nearest GQA to the 1.3B's 4 of 16; SwiGLU 4864 = 8/3 d rounded up to 256) so that depth, not
width, carries the compute. Same window, vocabulary, data and schedule as the 1.3B configs.

FLOPs matching, from ``python -m experiments.plan --config=experiments/configs/yoco_deep_1p3b.py
--archs=yoco`` against ``--config=experiments/configs/yocou_1p3b.py --archs=yoco,yocou``
(training FLOPs per token at N = 8192): YOCO-U 13.31 G, this config 10.99 G (0.83x), YOCO 7.66 G.
Every layer's matmuls scale with d^2 ((1792 / 2048)^2 = 0.77 per layer application, the same
40 applications); the cross-decoder's 20 full-attention layers (twice YOCO-U's 10) add
attention FLOPs back. So the deeper model matches YOCO-U's depth of 40 applications and comes
within 17% of its FLOPs per token (an equal-FLOPs width would be about d 2048, i.e. a 1.7B-param
model: the paper's 1792 trades some FLOPs for fewer extra parameters): 1.68B parameters against
YOCO-U's 1.29B, with a KV cache of 42 MiB at 32K tokens (YOCO-U: 94 MiB).
"""

import ml_collections

from experiments.configs import ladder

NUM_LAYERS, D_MODEL, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 40, 1792, 14, 2, 128


def get_config() -> ml_collections.ConfigDict:
  config = ladder.get_config("yoco,s4,tpu")
  config.model.update(num_layers=NUM_LAYERS, d_model=D_MODEL, num_heads=NUM_HEADS,
                      num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                      d_ff=ladder.swiglu_width(D_MODEL), num_recursive_layers=NUM_LAYERS // 2)
  return config
