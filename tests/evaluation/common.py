"""Helpers of the evaluation tests: a tiny trainer-layout run on disk, the float64 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import default
from tests.inference import reference as ref_lib
from yocou_jax.config import ModelConfig
from yocou_jax.data import tokenizers
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as ckpt_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib

TINY_RUN = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                vocab_size=384, window=4, num_iterations=2, attention_block_size=64)


def write_run(workdir: str, arch: str = "yocou", seed: int = 11):
  """A checkpoint as the trainer writes it (step 5, random weights) plus the byte tokenizer."""
  config = default.get_config()
  config.model.update(arch=arch, **TINY_RUN)
  config.data.seq_len = 32
  cfg = ModelConfig.from_config(config.model)
  params = jax.tree.map(jnp.asarray, ref_lib.random_params(cfg, seed=seed, std=0.3))
  tx = optimizer_lib.make_optimizer(config.train)
  state = step_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params,
                              opt_state=tx.init(params))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=2, use_async=False)
  checkpointer.save(5, state, config=config.to_dict())
  checkpointer.wait_until_finished()
  checkpointer.close()
  tokenizers.ByteTokenizer().save(f"{workdir}/tokenizer")
  return cfg, params


@functools.lru_cache(maxsize=None)
def forward(cfg: ModelConfig):
  """The training forward, jitted once per config."""
  return jax.jit(lambda p, t: Model(cfg).apply({"params": p}, t))


def token_logprobs(cfg: ModelConfig, params, tokens) -> np.ndarray:
  """log p(tokens[i] | tokens[:i]) for i >= 1, from the training forward, in float64."""
  logits = np.asarray(forward(cfg)(params, jnp.asarray([tokens], jnp.int32))[0], np.float64)
  logits = logits[:-1]
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logits[np.arange(len(tokens) - 1), np.asarray(tokens[1:])] - log_z
