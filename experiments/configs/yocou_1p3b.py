"""The paper's 1.3B dense comparison: 20 layers, d_model 2048, window 512, T = 3.

YOCO-U (arXiv 2604.01220) compares 1.3B dense models of 20 layers (10 self- + 10 cross-decoder
layers for YOCO/YOCO-U; 10 looped x 3 + 10 plain layers for RINS), SWA W = 512, T = 3, sequence
length 8192. The paper does not state heads, FFN width or vocabulary; the choices here are
Llama-style: 16 query heads of 128 (GQA with 4 K/V heads), SwiGLU width 5632 (~8/3 d rounded to a
multiple of 256), a 32K vocabulary. At these dims the transformer holds 1.04B parameters and
yoco/yocou 1.02B (0.90B/0.88B without embeddings; see
``python -m experiments.plan --config=experiments/configs/yocou_1p3b.py``); a 100K vocabulary
like YOCO's tiktoken cl100k (``--config.model.vocab_size=100352``) gives 1.31B / 1.29B.

Switch arch with ``--config.model.arch``. ``num_iterations`` is the T of every looped arch: the
paper's looped Transformer loops twice, so pass ``--config.model.num_iterations=2`` for it.
Everything not set here (training schedule, batch of 8 rows, mesh) comes from ``default.py``;
the paper's batch is 4M tokens (``--config.train.batch_size=512``).
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  m = config.model
  m.arch = "yocou"
  m.num_layers = 20  # 10 self-decoder + 10 cross-decoder layers (yoco/yocou).
  m.d_model = 2048
  m.num_heads = 16
  m.num_kv_heads = 4
  m.head_dim = 128
  m.d_ff = 5632  # SwiGLU: 8/3 * 2048 rounded up to a multiple of 256.
  m.vocab_size = 32768
  m.window = 512  # W, as in all the paper's experiments.
  m.num_iterations = 3  # T.
  m.num_recursive_layers = 10  # rins: the paper's 10 looped x 3 + 10 plain layers.
  m.dtype = "bfloat16"
  m.remat = "full"
  # XLA attention blocks: 32 causal chunks at 8192 tokens; SWA query blocks read 3 x 256 keys.
  m.attention_block_size = 256
  config.data.seq_len = 8192
  return config
