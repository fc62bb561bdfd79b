"""Exports of parscale and the upper loops through the remote-code modeling file agree with JAX.

Two-layer models (one self- and one cross-decoder layer for the upper loops); greedy generation
through ``generate`` is arch-independent and covered by test_export.py.
"""

import numpy as np
import pytest
import torch

from tests.export.test_export import (_forward_with_cache, check_directory, check_logits,
                                      save_random_checkpoint)
from yocou_jax.export import exporter, verify

CASES = {
    "parscale_P3": dict(arch="parscale", num_streams=3, prefix_length=3, num_layers=2),
    "yoco_upper_loop_T3": dict(arch="yoco_upper_loop", num_iterations=3, num_layers=2),
    "yoco_upper_loop_nokv_T3": dict(arch="yoco_upper_loop_nokv", num_iterations=3, num_layers=2),
}


def check_cached_decoding(cfg, model):
  """Prefill (last position only), 25 single steps and a chunk of 8 == one full forward."""
  tokens = torch.as_tensor(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 40)))
  with torch.no_grad():
    full = model(tokens, use_cache=False).logits
    logits, cache = _forward_with_cache(model, tokens[:, :7], None, logits_to_keep=1)
    pieces = [logits]
    for i in range(7, 32):
      logits, cache = _forward_with_cache(model, tokens[:, i:i + 1], cache)
      pieces.append(logits)
    pieces.append(_forward_with_cache(model, tokens[:, 32:], cache)[0])
  torch.testing.assert_close(torch.cat(pieces, 1), full[:, 6:], rtol=0, atol=1e-4)
  kv_shape = (2 * cfg.streams, 40, cfg.num_kv_heads, cfg.head_dim)
  if cfg.arch == "parscale":  # P x batch rows, every token; the prefixes stay in the weights.
    assert [kv[0].shape for kv in cache.layers] == [kv_shape] * cfg.num_layers
  else:  # The self-decoder's W-token rings once; one global K/V, or one per iteration.
    assert [kv[0].shape[1] for kv in cache.layers] == [cfg.window] * (cfg.num_layers // 2)
    assert [kv[0].shape for kv in cache.global_kvs] == [kv_shape] * cfg.global_kv_iterations


@pytest.mark.parametrize("case", list(CASES))
def test_export_agrees_with_jax(case, tmp_path):
  cfg = save_random_checkpoint(tmp_path, **CASES[case])
  ckpt = exporter.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  assert ckpt.model_cfg == cfg
  model = verify.load_torch_model(tmp_path / "export")
  check_directory(cfg, model, tmp_path / "export", ckpt.params, {})
  max_diff = check_logits(cfg, ckpt.params, model)
  check_cached_decoding(cfg, model)
  print(f"{case}: max |torch - jax| logit difference {max_diff:.2e}")
