"""Helpers of the inference tests: tiny configs, random params, the full-forward reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import default

from yocou_jax import accounting
from yocou_jax.config import ModelConfig
from yocou_jax.data import tokenizers
from yocou_jax.inference import engine as engine_lib
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as ckpt_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib

ARCHS = ("transformer", "yoco", "yocou", "rins", "looped")
# W = 4 so prompts and decodes cross many window wraps; one attention block in the reference.
TINY = dict(num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
            vocab_size=64, window=4, num_iterations=2, num_recursive_layers=2,
            attention_block_size=64)


def tiny(arch: str, **overrides) -> ModelConfig:
  return ModelConfig(arch=arch, **{**TINY, **overrides})


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.2):
  """Params of the training tree, drawn large enough that logits are O(1) (a demanding test)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, accounting.abstract_params(cfg))


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
  return jax.jit(lambda p, t: Model(cfg).apply({"params": p}, t))


def reference_logits(cfg: ModelConfig, params, tokens_BxN) -> np.ndarray:
  """The training model's full-sequence float32 logits [B, N, V]."""
  return np.asarray(_forward(cfg)(params, np.asarray(tokens_BxN, np.int32)))


def cached_logits(engine: engine_lib.Engine, params, tokens_BxN: np.ndarray, prompt_lengths,
                  steps: int, max_len: int):
  """Prefill each row's prompt, then feed its next ``steps`` tokens one by one (teacher forcing).

  Returns (logits [B, steps + 1, V] where entry i is at position prompt_length - 1 + i, state).
  """
  lengths = np.asarray(prompt_lengths, np.int32)
  prompts = np.where(np.arange(lengths.max())[None] < lengths[:, None],
                     tokens_BxN[:, :lengths.max()], 0)
  logits, state = engine.prefill(params, prompts, lengths, max_len)
  out = [np.asarray(logits)]
  rows = np.arange(len(lengths))
  for i in range(steps):
    logits, state = engine.decode(params, state, tokens_BxN[rows, lengths + i])
    out.append(np.asarray(logits))
  return np.stack(out, axis=1), state


def reference_at(ref_BxNxV: np.ndarray, prompt_lengths, steps: int) -> np.ndarray:
  """ref[b, prompt_length_b - 1 + i] for i in [0, steps]: what cached_logits must return."""
  idx = np.asarray(prompt_lengths)[:, None] - 1 + np.arange(steps + 1)[None]
  return np.take_along_axis(ref_BxNxV, idx[:, :, None], axis=1)


TINY_RUN = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                vocab_size=384, window=4, num_iterations=2, attention_block_size=64)


def write_run(workdir: str, arch: str = "yocou", attention_impl: str = "xla", seed: int = 11):
  """A checkpoint exactly as the trainer writes it (step 5, random weights) plus the tokenizer."""
  config = default.get_config()
  config.model.update(arch=arch, attention_impl=attention_impl, **TINY_RUN)
  config.data.seq_len = 32
  cfg = ModelConfig.from_config(config.model)
  params = jax.tree.map(jnp.asarray, random_params(cfg, seed=seed, std=0.3))
  tx = optimizer_lib.make_optimizer(config.train)
  state = step_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params,
                              opt_state=tx.init(params))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=2, use_async=False)
  checkpointer.save(5, state, config=config.to_dict())
  checkpointer.wait_until_finished()
  checkpointer.close()
  tokenizers.ByteTokenizer().save(f"{workdir}/tokenizer")
  return cfg, params
