"""Cached prefill + decode of MoE models equals the training model's forward (dropless routing)."""

import numpy as np
import pytest

from tests.inference import reference as ref_lib
from yocou_jax.inference import engine as engine_lib

MOE = dict(ffn="moe", num_experts=4, num_experts_per_token=2, expert_d_ff=16,
           num_shared_experts=1)


# moe_layers=2: an interleaved stack (every second layer MoE), through engine.layer_params.
@pytest.mark.parametrize("arch,moe_layers", [("transformer", 1), ("yocou", 1), ("yocou", 2)])
def test_moe_prefill_and_decode_match_forward(arch, moe_layers):
  cfg = ref_lib.tiny(arch, moe_layers=moe_layers, **MOE)
  params = ref_lib.random_params(cfg, seed=7)
  tokens = np.random.default_rng(8).integers(0, 64, (2, 24)).astype(np.int32)
  lengths, steps = [5, 14], 9
  opts = engine_lib.Options(chunk_size=4, kv_block=4, decode_kv_block=8, window_block=4)
  got, _ = ref_lib.cached_logits(engine_lib.Engine(cfg, opts), params, tokens, lengths, steps, 24)
  want = ref_lib.reference_at(ref_lib.reference_logits(cfg, params, tokens), lengths, steps)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
