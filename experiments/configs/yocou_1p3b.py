"""The paper's 1.3B dense comparison: 20 layers, d_model 2048, window 512, T = 3.

YOCO-U (arXiv 2604.01220) compares 1.3B dense models of 20 layers (10 self- + 10 cross-decoder
layers for YOCO/YOCO-U; 10 looped x 3 + 10 plain layers for RINS), SWA W = 512, T = 3, sequence
length 8192, 4M-token batches, AdamW (0.9, 0.95), lr 1e-3. The paper does not state heads, FFN
width or vocabulary; the choices here are Llama-style: 16 query heads of 128 (GQA with 4 K/V
heads), SwiGLU width 5632 (8/3 d rounded up to a multiple of 256) and a 100K vocabulary like
YOCO's tiktoken cl100k, which gives 1.31B parameters for the transformer and 1.29B for
yoco/yocou (``python -m experiments.plan --config=experiments/configs/yocou_1p3b.py``).

This is rung ``s4`` of ``ladder.py`` on TPU (full FSDP). Switch arch with ``--config.model.arch``;
``num_iterations`` is the T of every looped arch (the paper's looped Transformer loops twice:
``--config.model.num_iterations=2``). For GPU hosts use ``ladder.py:yocou,s4,gpu``.
"""

import ml_collections

from experiments.configs import ladder


def get_config() -> ml_collections.ConfigDict:
  return ladder.get_config("yocou,s4,tpu")
