"""The embedded default: a small YOCO-U (T=3) trained on the Python standard library's source.

Every binary's ``--config`` defaults to this file. Every knob has one name, a default and a
one-line comment; other configs start from ``get_config()`` here and override what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init and the data order.

  # --- model -----------------------------------------------------------------------------------
  m = config.model = ml_collections.ConfigDict()
  m.arch = "yocou"  # One of: transformer, yoco, yocou, rins, looped.
  m.num_layers = 4  # Total layers; for yoco/yocou half self-decoder, half cross-decoder.
  m.d_model = 128  # Residual stream width.
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # K/V heads (GQA); must divide num_heads.
  m.head_dim = 32  # Per-head width.
  m.d_ff = 384  # SwiGLU hidden width.
  m.vocab_size = 256  # Byte-level tokenizer by default.
  m.window = 64  # Sliding window W of the self-decoder (keys i-W+1..i).
  m.num_iterations = 3  # T: loops of the self-decoder (yocou) / recursive block (rins, looped).
  m.num_recursive_layers = 2  # rins: how many leading layers are looped.
  m.cross_rope = False  # yoco/yocou: RoPE on cross-decoder Q and global K (NoPE by default).
  m.tie_embeddings = False  # Share the input embedding with the output projection.
  m.dtype = "float32"  # Activation dtype: float32 or bfloat16 (params stay float32).
  m.attention_impl = "xla"  # Attention backend: xla (pallas, cudnn with the kernels).
  m.remat = "none"  # Rematerialisation: none, full, dots (save matmul outputs).
  m.rope_theta = 10_000.0  # RoPE base.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.init_std = 0.02  # Std of the normal initialiser of every weight matrix.
  m.attention_block_size = 128  # XLA attention: query/key block length (SWA and causal chunks).

  # --- data ------------------------------------------------------------------------------------
  d = config.data = ml_collections.ConfigDict()
  d.seq_len = 256  # Tokens per packed training row.

  # --- training --------------------------------------------------------------------------------
  t = config.train = ml_collections.ConfigDict()
  t.batch_size = 8  # Global batch size in rows.
  t.steps = 300  # Optimizer steps.
  t.learning_rate = 3e-3  # Peak learning rate.

  # --- mesh ------------------------------------------------------------------------------------
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel axis size (-1: the rest of the devices).
  mesh.fsdp = 1  # Parameter-sharded data-parallel axis size.
  mesh.tensor = 1  # Tensor-parallel axis size.
  return config
