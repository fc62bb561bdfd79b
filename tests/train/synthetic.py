"""Synthetic, deterministic training data and tiny configs shared by the trainer tests."""

import grain
import numpy as np

from experiments.configs import default

SEQ_LEN = 32
BATCH = 8


def synthetic_row(index: int) -> dict:
  """A packed row of two documents with a learnable pattern, a pure function of ``index``."""
  rng = np.random.default_rng(index)
  tokens = rng.integers(3, 64, size=SEQ_LEN).astype(np.int32)
  tokens[1::2] = (tokens[0::2] + 1) % 64
  cut = int(rng.integers(8, SEQ_LEN - 8))
  segment_ids = np.where(np.arange(SEQ_LEN) < cut, 1, 2).astype(np.int32)
  positions = np.where(segment_ids == 1, np.arange(SEQ_LEN), np.arange(SEQ_LEN) - cut)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


def synthetic_data(seed=0, process_index=0, process_count=1):
  """(grain iterator, eval batches, tokenizer=None): the trainer's ``data`` argument."""
  per_process = BATCH // process_count

  def local_rows(batch):
    return {k: v[process_index * per_process:(process_index + 1) * per_process]
            for k, v in batch.items()}

  train = (grain.MapDataset.range(1000).seed(seed).shuffle().map(synthetic_row).repeat()
           .batch(BATCH).map(local_rows).to_iter_dataset())
  eval_batches = [local_rows({k: np.stack([synthetic_row(10_000 + b * BATCH + i)[k]
                                           for i in range(BATCH)])
                              for k in ("tokens", "segment_ids", "positions")})
                  for b in range(2)]
  return iter(train), eval_batches, None


def tiny_config(arch="yocou", steps=20, mesh=(1, 1, 1)):
  c = default.get_config()
  c.model.update(arch=arch, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                 d_ff=64, vocab_size=64, window=8, num_iterations=2, num_recursive_layers=1,
                 attention_block_size=8)
  c.data.update(seq_len=SEQ_LEN, tokenizer="byte")  # Not the default BPE: no training to wait for.
  c.train.update(batch_size=BATCH, steps=steps, learning_rate=1e-2, warmup_steps=3)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.logging.update(every_steps=1, tensorboard=False, progress=False)
  c.eval.update(every_steps=10, batch_size=BATCH)
  c.checkpoint.update(every_steps=5, keep=10)
  return c
