"""A scaling ladder of every arch, for FLOPs-vs-loss curves, with TPU / GPU / CPU mesh variants.

  --config=experiments/configs/ladder.py:ARCH,SIZE[,PLATFORM[,moe]]

ARCH is one of transformer, yoco, yocou, rins, looped, parscale (P = 2 streams: about twice
the transformer's FLOPs), yoco_upper_loop, yoco_upper_loop_nokv (T = 3); SIZE a rung below; PLATFORM one of
``tpu`` (default: full FSDP over every chip, bfloat16, remat), ``gpu`` (FSDP within a host of 8
GPUs, data parallel across hosts) or ``cpu`` (a tiny smoke-test run of the same shapes' family).
A trailing ``moe`` swaps every dense FFN for a Mixture-of-Experts of the same *active* width:
top-K routed experts plus one shared expert, each ``d_ff / (K + 1)`` wide (64 experts top-8 on
accelerators, 8 experts top-2 on cpu), so the MoE rung costs the dense rung's FLOPs per token
(plus the router) with E / (K + 1) times its FFN parameters.

Rungs share the aspect ratios of Llama-style models (head_dim 128 from s2 up, GQA 4:1, SwiGLU
8/3 d rounded to 256) and, per rung, every arch has the same layer count, width and heads, so
the curves compare architectures at equal parameters (yocou/rins/looped spend more FLOPs per
token on their loops; plot against ``cumulative_train_flops``). Steps follow a Chinchilla-style
budget of ``tokens_per_param`` x non-embedding parameters (an estimate; ``experiments.plan``
prints the exact counts).
"""

import ml_collections

from experiments.configs import default

# name: (num_layers, d_model, num_heads, num_kv_heads, head_dim)
RUNGS = {
    "s0": (8, 512, 8, 2, 64),
    "s1": (12, 768, 12, 4, 64),
    "s2": (16, 1024, 8, 2, 128),
    "s3": (20, 1536, 12, 4, 128),
    "s4": (20, 2048, 16, 4, 128),  # The paper's 1.3B dense comparison (with a 100K vocab).
    "s5": (28, 2560, 20, 4, 128),
    "s6": (26, 3072, 24, 8, 128),  # YOCO's 3B: 26 layers, d 3072, 24 heads / 8 KV heads.
}
PLATFORMS = ("tpu", "gpu", "cpu")
TOKENS_PER_PARAM = 20
VOCAB_SIZE = 100352  # cl100k-sized vocabulary (train one with experiments.train_tokenizer).


def swiglu_width(d_model: int) -> int:
  return -(-(8 * d_model // 3) // 256) * 256


def get_config(spec: str = "yocou,s0,tpu") -> ml_collections.ConfigDict:
  parts = spec.split(",")
  if len(parts) not in (2, 3, 4) or (len(parts) == 4 and parts[3] != "moe"):
    raise ValueError(f"ladder spec {spec!r} is invalid: expected ARCH,SIZE[,PLATFORM[,moe]]")
  arch, size = parts[:2]
  platform = parts[2] if len(parts) >= 3 else "tpu"
  if size not in RUNGS:
    raise ValueError(f"ladder size {size!r} is invalid; allowed: {sorted(RUNGS)}")
  if platform not in PLATFORMS:
    raise ValueError(f"ladder platform {platform!r} is invalid; allowed: {PLATFORMS}")

  config = default.get_config()
  num_layers, d_model, heads, kv_heads, head_dim = RUNGS[size]
  config.model.update(
      arch=arch, num_layers=num_layers, d_model=d_model, num_heads=heads, num_kv_heads=kv_heads,
      head_dim=head_dim, d_ff=swiglu_width(d_model), vocab_size=VOCAB_SIZE, window=512,
      num_iterations=3, num_recursive_layers=num_layers // 2, dtype="bfloat16", remat="full",
      attention_block_size=128,
      # SwiGLU over 2048-position chunks of each 8192-token row: the backward pass holds one
      # chunk's [rows, 2048, d_ff] intermediates (s4 proxy, 4 layers: 17.5 -> 12.3 GiB a chip).
      ffn_chunk_size=2048)
  # Pass --config.data.tokenizer=PATH to a ~100K-token tokenizer for real runs (train one with
  # experiments.train_tokenizer); bytes keep every rung runnable out of the box.
  config.data.tokenizer = "byte"
  config.data.seq_len = 8192
  non_embedding = num_layers * (d_model * head_dim * (2 * heads + 2 * kv_heads)
                                + 3 * d_model * swiglu_width(d_model))
  batch_rows = 512  # 4M tokens per step, as in the paper.
  steps = max(1000, TOKENS_PER_PARAM * non_embedding // (batch_rows * 8192))
  # 4 microbatches of 128 rows (TPU rungs from s4 up: 2, below): a v5p-8 holds 16 rows of 8192
  # per chip per pass with the fused loss (s4 yocou: 48.4 GiB of temporaries with full remat,
  # 21.9 with the TPU default offload; with the materialised [rows, 8192, 100352] logits it
  # needed 16 microbatches). Check a slice with python -m experiments.compile_for; larger slices
  # hold the same rows per chip in fewer passes.
  config.train.update(batch_size=batch_rows, steps=steps, learning_rate=1e-3, b1=0.9, b2=0.95,
                      warmup_steps=375, schedule="linear", min_lr_ratio=0.0, weight_decay=0.05,
                      z_loss=1e-4, microbatches=4)
  config.eval.update(every_steps=500, num_batches=16, batch_size=64)
  config.checkpoint.update(every_steps=500, keep=3)
  config.logging.every_steps = 20

  if platform == "tpu":
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.model.attention_impl = "auto"  # Pallas (TPU) / best GPU kernel; see kernels/ops.py.
    if d_model >= 2048:
      # Each layer application's saved input in pinned host memory instead of HBM: s4 yocou on a
      # v5p-8 at 4 microbatches holds 1.37 GiB a row of 8192 tokens instead of 3.0 with full
      # remat (21.9 GiB of temporaries a chip instead of 48.4; yocou_1p3b.py), so 2 microbatches
      # of 256 rows fit (yocou 41.5 GiB a chip in all, rins 40.1; 1 microbatch: yocou 81.5 of 95,
      # too little headroom for the heavier archs). Smaller rungs fit with full remat at 4 and
      # skip the host round trips.
      config.model.remat = "offload"
      config.train.microbatches = 2
  elif platform == "gpu":
    config.mesh.update(data=-1, fsdp=8, tensor=1)
    config.model.attention_impl = "auto"  # Pallas (TPU) / best GPU kernel; see kernels/ops.py.
  else:  # cpu: the same family, shrunk to run in minutes on a laptop.
    config.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                        d_ff=384, vocab_size=384, window=64, num_recursive_layers=2,
                        dtype="float32", remat="none", ffn_chunk_size=0)
    config.data.seq_len = 256
    config.train.update(batch_size=8, steps=300, learning_rate=3e-3, warmup_steps=30,
                        z_loss=0.0, microbatches=1)
    config.eval.update(every_steps=100, num_batches=4, batch_size=8)
    config.checkpoint.every_steps = 100
    config.logging.every_steps = 10
  if len(parts) == 4:
    experts, top_k = (8, 2) if platform == "cpu" else (64, 8)
    config.model.update(ffn="moe", num_experts=experts, num_experts_per_token=top_k,
                        num_shared_experts=1,
                        expert_d_ff=config.model.d_ff // (top_k + 1) // 64 * 64)
  return config
