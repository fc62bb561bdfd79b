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
  m.arch = "yocou"  # transformer, yoco, yocou, rins, looped, parscale, yoco_upper_loop(_nokv).
  m.num_layers = 4  # Total layers; for yoco/yocou half self-decoder, half cross-decoder.
  m.d_model = 128  # Residual stream width.
  m.num_heads = 4  # Query heads.
  m.num_kv_heads = 2  # K/V heads (GQA); must divide num_heads.
  m.head_dim = 32  # Per-head width.
  m.d_ff = 384  # SwiGLU hidden width.
  m.vocab_size = 1024  # >= the tokenizer's vocabulary (bpe:1024: 1024, byte: 259); x 128.
  m.window = 64  # Sliding window W of the self-decoder (keys i-W+1..i).
  m.num_iterations = 3  # T: loops of the self-decoder (yocou), recursive block (rins, looped),
  # or cross-decoder (yoco_upper_loop: one shared K/V; yoco_upper_loop_nokv: K/V per iteration).
  m.num_recursive_layers = 2  # rins: how many leading layers are looped.
  m.cross_rope = False  # yoco/yocou: RoPE on cross-decoder Q and global K (NoPE by default).
  m.tie_embeddings = False  # Share the input embedding with the output projection.
  m.dtype = "float32"  # Activation dtype: float32 or bfloat16 (params stay float32).
  m.attention_impl = "xla"  # Attention backend: xla (pallas, cudnn with the kernels).
  m.remat = "none"  # Rematerialisation: none, full, dots (save matmul outputs), offload (full;
  # layer inputs kept in pinned host memory).
  m.rope_theta = 10_000.0  # RoPE base.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.init_std = 0.02  # Std of the normal initialiser of every weight matrix.
  m.attention_block_size = 128  # XLA attention: query/key block length (SWA and causal chunks).
  # Looped archs (yocou, rins, looped): True compiles the T applications of the shared block as T
  # unrolled copies (faster steps: no [T, ...] residual stacking in a while loop); False as one
  # loop (compile time and program size independent of T). The parameters are shared either way.
  m.unroll_loops = True
  # Every stack of distinct layers compiled as that many unrolled copies (True) or as one loop
  # (False: compile time and program size independent of depth). The parameters are the same.
  m.unroll_layers = False
  # Output projection + cross-entropy fused and chunked (yocou_jax/loss.py): positions of every
  # row per chunk, so only [rows, chunk, vocab] logits exist at a time. 0: per backend (256 on
  # TPU/GPU, the whole row on CPU); -1: materialise the [rows, seq_len, vocab] logits.
  m.loss_chunk_size = 0
  # Dense SwiGLU run over chunks of this many positions of every row, each rematerialised, so the
  # backward pass holds one chunk's [rows, chunk, d_ff] intermediates (long rows on accelerators).
  # 0: whole rows. Rows that are not a longer multiple of it run whole.
  m.ffn_chunk_size = 0
  # Mixture-of-Experts feed-forward (yocou_jax/moe.py); the fields below apply when ffn = "moe".
  m.ffn = "dense"  # Feed-forward of every layer: dense (SwiGLU d_ff) or moe.
  m.num_experts = 8  # Routed experts E.
  m.num_experts_per_token = 2  # Top-k: routed experts per token.
  m.num_shared_experts = 1  # Always-on experts (one SwiGLU of num_shared x shared width).
  m.expert_d_ff = 128  # SwiGLU hidden width of one routed expert.
  m.shared_expert_d_ff = 0  # SwiGLU hidden width of one shared expert (0: expert_d_ff).
  m.router_aux_loss = 0.01  # Weight of the Switch load-balancing loss (K at perfect balance).
  m.router_z_loss = 1e-3  # Weight of the router z-loss mean logsumexp(router logits)^2.
  m.capacity_factor = 0.0  # Slots per expert = ceil(cf * tokens * K / E); 0: dropless.
  m.moe_layers = 1  # Every k-th layer of each stack is MoE (1: all), the rest dense SwiGLU d_ff.
  m.expert_sharding = "fsdp"  # fsdp: experts sharded like any weight; expert: over the fsdp axis.
  # Grouped matmul of the dropless experts: auto (TPU megablox, GPU ragged_dot, CPU blocked),
  # ragged_dot, blocked (row blocks of one expert each), megablox (TPU Pallas; interpreted off TPU).
  m.moe_matmul = "auto"
  m.moe_block_rows = 128  # Row block of the blocked and megablox grouped matmuls (multiple of 8).
  # ParScale (arch="parscale", yocou_jax/parscale.py): P streams of one transformer.
  m.num_streams = 2  # P parallel streams (P x batch rows; ~P x the transformer's FLOPs).
  m.prefix_length = 48  # Learned prefix K/V tokens per stream and layer (official default 48).
  m.stream_weight_smoothing = 0.01  # Label smoothing of the stream weights: w (1 - s) + s / P.

  # --- data ------------------------------------------------------------------------------------
  d = config.data = ml_collections.ConfigDict()
  d.seq_len = 256  # Tokens per packed training row.
  d.tfds_name = "python_stdlib"  # python_stdlib, text_files, or any prepared array_record TFDS.
  d.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)  # None: TFDS default dir.
  d.text_glob = ml_collections.FieldReference(None, field_type=str)  # text_files: dir or glob.
  d.text_key = "text"  # Feature holding the document text.
  # byte; bpe:N (a byte-level BPE of N ids trained at the run's start on its training text,
  # saved in the workdir); a SentencePiece .model, a tokenizer.json or a saved tokenizer directory.
  d.tokenizer = "bpe:1024"
  d.num_workers = 0  # grain worker processes for the training pipeline.
  d.train_split = "train"  # TFDS split to train on.
  d.eval_split = "validation"  # TFDS split to evaluate on.
  d.packing_bins = 64  # First-fit packing: rows open at once (more bins, fewer padding tokens).
  d.shuffle_window = 1024  # Packed rows shuffled within windows of this many rows.
  # Several training sources mixed by weight (empty: the one source tfds_name). One string,
  # sources separated by ";", fields by ",": "name=web,kind=parquet,path=gs://b/fw/*.parquet,
  # weight=0.7;name=sft,kind=chat,path=/d/sft.jsonl.zst,weight=0.3". Fields: name, kind
  # (tfds, text_files, parquet, jsonl [.gz/.zst], chat), path (glob or URL), weight (1),
  # text_key (data.text_key), split (tfds/text_files only). See yocou_jax/data/sources.py.
  d.sources = ""
  d.eval_sources = ""  # Validation sources, same form (empty: tfds/text_files sources' eval_split).
  # chat sources: per-message format string (assistant content trained), or "tokenizer" (its
  # Jinja chat template). See yocou_jax/data/chat.py.
  d.chat_template = "<|{role}|>\n{content}<|end|>\n"
  d.shuffle_blocks = 4  # File sources: row groups / file blocks whose documents shuffle together.
  d.index_dir = "~/.cache/yocou_jax/jsonl_index"  # JSONL line-offset indices, built once per file.
  # sources: global (every process packs the global batch, keeps its rows; resumes on any
  # process count) or shard (each process reads 1/P of every source; same process count).
  d.process_sharding = "global"

  # --- training --------------------------------------------------------------------------------
  t = config.train = ml_collections.ConfigDict()
  t.batch_size = 8  # Global batch size in rows.
  t.steps = 600  # Optimizer steps (unless a budget below decides them).
  t.flops_budget = 0.0  # >0: steps = floor(budget / analytic training FLOPs per step).
  t.tokens_budget = 0.0  # >0: steps = floor(budget / tokens per step); both set: fewer steps.
  # Peak learning rate, tuned for this config (yocou T=3, byte tokenizer): final validation loss
  # 2.522 / 2.252 / 2.534 at 3e-4 / 1e-3 / 3e-3 (other archs and sizes:
  # experiments/configs/sweeps/cpu_common.py).
  t.learning_rate = 1e-3
  t.warmup_steps = 30  # Linear warmup from lr/warmup to lr.
  t.schedule = "cosine"  # Decay after warmup: cosine, linear or constant.
  t.min_lr_ratio = 0.1  # Final learning rate as a fraction of the peak.
  t.b1 = 0.9  # AdamW beta1.
  t.b2 = 0.95  # AdamW beta2.
  t.eps = 1e-8  # AdamW epsilon.
  t.weight_decay = 0.1  # Decoupled weight decay (AdamW).
  t.decay_embeddings = False  # Apply weight decay to embedding / output matrices too.
  t.decay_norms = False  # Apply weight decay to norm scales too.
  t.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
  t.microbatches = 1  # Gradient accumulation: microbatches per optimizer step.
  t.z_loss = 0.0  # Weight of the z-loss (mean log(Z)^2) regulariser.
  t.nonfinite = "skip"  # Non-finite loss/gradients: skip the update, or stop the run at once.
  t.max_skipped_steps = 10  # nonfinite="skip": stop once this many updates in a row were skipped.
  t.collective_timeout_s = 100  # Multi-process: a process silent this long is dead; all stop.
  # A run's workdir: start from the params of its newest intact checkpoint (fresh optimizer,
  # step 0, this config's data); ignored once this workdir holds its own checkpoints.
  t.init_from = ml_collections.FieldReference(None, field_type=str)

  # --- evaluation ------------------------------------------------------------------------------
  e = config.eval = ml_collections.ConfigDict()
  e.every_steps = 100  # Evaluate every this many steps (and at the end).
  e.num_batches = 4  # Fixed validation batches per evaluation.
  e.batch_size = 8  # Rows per validation batch.

  # --- checkpointing ---------------------------------------------------------------------------
  c = config.checkpoint = ml_collections.ConfigDict()
  c.every_steps = 100  # Save every this many steps (and at the end, and on SIGTERM).
  c.keep = 3  # Keep the newest this many checkpoints.
  c.use_async = True  # Write checkpoints in the background.

  # --- logging ---------------------------------------------------------------------------------
  lg = config.logging = ml_collections.ConfigDict()
  lg.every_steps = 10  # Log metrics every this many steps.
  lg.tensorboard = True  # Also write TensorBoard event files.
  lg.progress = True  # One-line progress display on the console.
  wb = lg.wandb = ml_collections.ConfigDict()  # Weights & Biases (the `wandb` extra).
  wb.mode = "disabled"  # disabled, offline (run files only, `wandb sync` later) or online.
  wb.project = "yocou_jax"  # W&B project.
  wb.entity = ml_collections.FieldReference(None, field_type=str)  # Team or user (None: default).
  wb.name = ml_collections.FieldReference(None, field_type=str)  # Run name (None: the workdir's).
  wb.dir = ml_collections.FieldReference(None, field_type=str)  # Run files root (None: workdir).

  # --- profiling -------------------------------------------------------------------------------
  prof = config.profile = ml_collections.ConfigDict()
  prof.steps = ""  # "START,STOP": trace steps START..STOP into workdir/tensorboard ("": off).
  prof.all_processes = False  # Trace on every process (default: process 0 only).

  # --- inference -------------------------------------------------------------------------------
  inf = config.inference = ml_collections.ConfigDict()
  inf.chunk_size = 512  # Prefill chunk length (bounds prefill memory for long prompts).

  # --- mesh ------------------------------------------------------------------------------------
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel axis size (-1: the rest of the devices).
  mesh.fsdp = 1  # Parameter-sharded data-parallel axis size.
  mesh.tensor = 1  # Tensor-parallel axis size.
  return config
