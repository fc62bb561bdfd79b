"""SFT loss masks in the train/eval steps, per-source evaluation and a mixture run of the trainer."""

import functools
import logging as std_logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

from tests.data.test_sources import write_parquet
from tests.train.synthetic import tiny_config
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.data import pipeline
from yocou_jax.data import tokenizers
from yocou_jax.model import Model
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import safety
from yocou_jax.train import step as step_lib
from yocou_jax.train import trainer

SFT_SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "data", "testdata",
                          "sft_sample.jsonl")
SEQ_LEN = 64
TOKENIZER = tokenizers.ByteTokenizer()


def _config(tmp_path, sources: str, eval_sources: str = "", steps: int = 4):
  config = tiny_config(arch="transformer", steps=steps)
  config.model.vocab_size = 272  # The byte tokenizer's 259 ids, rounded up.
  config.model.window = 16
  config.data.update(seq_len=SEQ_LEN, sources=sources, eval_sources=eval_sources,
                     packing_bins=8, shuffle_window=16, shuffle_blocks=2,
                     index_dir=str(tmp_path / "index"), tfds_data_dir=str(tmp_path / "tfds"))
  config.train.batch_size = 4
  config.eval.update(batch_size=4, num_batches=2, every_steps=steps)
  return config


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
  """A tiny model, its params, and the first SFT eval batches of the sample."""
  tmp_path = tmp_path_factory.mktemp("sft")
  config = _config(tmp_path, f"name=sft,kind=chat,path={SFT_SAMPLE}",
                   f"name=sft,kind=chat,path={SFT_SAMPLE}")
  model = Model(ModelConfig.from_config(config.model))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
  batches = pipeline.make_eval_batches(config.data, TOKENIZER, global_batch_size=4,
                                       num_batches=2)["sft"]
  eval_fn = jax.jit(lambda p, b: step_lib.eval_step(p, b, model=model))
  return config, model, params, batches, eval_fn


@functools.lru_cache(maxsize=1)
def _apply(model):
  return jax.jit(model.apply)


def _reference_masked_ce(model, params, batch) -> tuple[float, float]:
  """(sum, count) of the float64 next-token CE on targets of weight 1 within a document."""
  logits = np.asarray(_apply(model)({"params": params}, batch["tokens"], batch["segment_ids"],
                                    batch["positions"]), np.float64)
  log_probs = scipy.special.log_softmax(logits, axis=-1)
  total, count = 0.0, 0
  tokens, segments, weights = batch["tokens"], batch["segment_ids"], batch["loss_weights"]
  for b, t in np.ndindex(tokens.shape[0], tokens.shape[1] - 1):
    if segments[b, t] > 0 and segments[b, t + 1] == segments[b, t] and weights[b, t + 1] == 1:
      total -= log_probs[b, t, tokens[b, t + 1]]
      count += 1
  return total, count


def test_sft_loss_equals_a_reference_masked_cross_entropy(sft):
  config, model, params, batches, eval_fn = sft
  batch = batches[0]
  ref_sum, ref_count = _reference_masked_ce(model, params, batch)
  unmasked = int(np.sum((batch["segment_ids"][:, :-1] > 0)
                        & (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])))
  assert 0 < ref_count < 0.6 * unmasked  # The mask drops the prompts.
  out = eval_fn(params, batch)
  assert float(out["num_tokens"]) == ref_count
  np.testing.assert_allclose(float(out["loss_sum"]), ref_sum, rtol=1e-5)
  tx = optax.sgd(0.0)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=tx.init(params))
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  _, metrics = jax.jit(lambda s, b: step_lib.train_step(  # Microbatches split the mask too.
      s, b, model=model, tx=tx, schedule=schedule, microbatches=2))(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), ref_sum / ref_count, rtol=1e-5)
  assert float(metrics["num_tokens"]) == ref_count


def test_evaluate_reports_each_source_and_the_token_weighted_total(sft):
  _, model, params, batches, eval_fn = sft
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  record = trainer.evaluate(eval_fn, params, {"a": batches[:1], "b": batches[1:]}, sharding)
  sums = [_reference_masked_ce(model, params, batch) for batch in batches]
  for name, (ref_sum, ref_count) in zip("ab", sums):
    np.testing.assert_allclose(record[f"eval_loss/{name}"], ref_sum / ref_count, rtol=1e-5)
    assert record[f"eval_tokens/{name}"] == ref_count
  np.testing.assert_allclose(record["eval_loss"], sum(s for s, _ in sums) / sum(n for _, n in sums),
                             rtol=1e-5)


def test_trainer_mixture_run_reports_tokens_and_loss_per_source(tmp_path):
  texts = [f"web document {i} " + "lorem ipsum " * (i % 7) for i in range(64)]
  parquet = write_parquet(tmp_path / "web", texts, files=2, row_group_size=8)
  config = _config(tmp_path, f"name=web,kind=parquet,path={parquet},weight=1;"
                             f"name=sft,kind=chat,path={SFT_SAMPLE},weight=1",
                   f"name=web,kind=parquet,path={parquet};name=sft,kind=chat,path={SFT_SAMPLE}",
                   steps=2)
  history = trainer.train(config, str(tmp_path / "run"), devices=jax.devices()[:1]).history
  last = history[-1]
  drawn = {name: sum(r.get(f"source_tokens/{name}", 0) for r in history) for name in ("web", "sft")}
  assert drawn["web"] > 0 and drawn["sft"] > 0  # Tokens of each source in the 2 x 4 rows,
  assert 0.5 * 2 * 4 * SEQ_LEN < drawn["web"] + drawn["sft"] <= 2 * 4 * SEQ_LEN  # padding aside.
  total = last["eval_tokens/web"] + last["eval_tokens/sft"]
  np.testing.assert_allclose(last["eval_loss"], (last["eval_loss/web"] * last["eval_tokens/web"]
                                                 + last["eval_loss/sft"] * last["eval_tokens/sft"])
                             / total, rtol=1e-6)


def test_resume_allows_and_logs_a_weight_change_only(caplog):
  saved = {"data": {"sources": "name=web,kind=parquet,path=/d/*.parquet,weight=3;"
                               "name=sft,kind=chat,path=/s.jsonl"}}
  reweighted = {"data": {"sources": "name=web,kind=parquet,path=/d/*.parquet,weight=1;"
                                    "name=sft,kind=chat,path=/s.jsonl,weight=2"}}
  with caplog.at_level(std_logging.WARNING):
    safety.check_resume(saved, reweighted, step=7, directory="/ckpt", has_data_state=True)
  assert "resuming from step 7 with new mixture weights" in caplog.text
  moved = {"data": {"sources": "name=web,kind=parquet,path=/e/*.parquet,weight=3;"
                               "name=sft,kind=chat,path=/s.jsonl"}}
  with pytest.raises(ConfigError, match=r"refusing to resume from step 7 .* data.sources: "):
    safety.check_resume(saved, moved, step=7, directory="/ckpt", has_data_state=True)


def test_resume_takes_a_model_field_the_checkpoint_predates_as_its_default():
  saved = {"model": {"arch": "yocou", "d_model": 64}}  # Saved before ``ffn`` existed.
  current = {"model": {"arch": "yocou", "d_model": 64, "ffn": "dense"}}
  safety.check_resume(saved, current, step=3, directory="/ckpt", has_data_state=False)
  with pytest.raises(ConfigError, match=r"model.ffn: 'dense' -> 'moe'"):
    safety.check_resume(saved, {"model": {**current["model"], "ffn": "moe"}}, step=3,
                        directory="/ckpt", has_data_state=False)
