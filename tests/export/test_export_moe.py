"""MoE exports agree with the JAX model: the transformer as native Qwen2-MoE, yocou by remote code."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
import transformers

from tests.export import test_export as dense
from yocou_jax.export import exporter, hf, verify

MOE = dict(ffn="moe", num_experts=4, num_experts_per_token=2, expert_d_ff=16,
           num_shared_experts=1, shared_expert_d_ff=24)


@pytest.mark.parametrize("arch", ["transformer", "yocou"])
def test_moe_export_agrees_with_jax(arch, tmp_path):
  """Logits, greedy generation and cached decoding of a checkpoint saved on 8 devices."""
  cfg = dense.save_random_checkpoint(tmp_path, arch=arch, **MOE)
  ckpt = exporter.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  config = json.loads((tmp_path / "export" / "config.json").read_text())
  if arch == "transformer":  # Native class, no custom code.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert type(model) is transformers.Qwen2MoeForCausalLM
    assert not any(f.endswith(".py") for f in os.listdir(tmp_path / "export"))
  else:
    model = verify.load_torch_model(tmp_path / "export")
    assert type(model).__name__ == "YocouForCausalLM" and config["arch"] == "yocou"
  assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"],
          config["shared_expert_intermediate_size"]) == (4, 2, 16, 24)
  # Every parameter is exported once (Qwen2-MoE adds one zero shared-expert gate per layer).
  extra = sum(x.size for x in hf.constant_tensors(cfg).values())
  assert sum(p.numel() for p in model.parameters()) == (
      sum(np.size(x) for x in jax.tree.leaves(ckpt.params)) + extra)
  dense.check_logits(cfg, ckpt.params, model)
  dense.check_greedy_generation(cfg, ckpt.params, model)
  dense.check_cached_decoding(cfg, model)


def test_moe_tensors_round_trip_through_hugging_face_names():
  cfg = dense.ModelConfig(arch="transformer", **{**dense.TINY, **MOE})
  params = dense.random_params(cfg, seed=4)
  tensors = hf.params_to_tensors(cfg, params)
  assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].shape == (16, 32)
  np.testing.assert_array_equal(tensors["model.layers.0.mlp.experts.2.down_proj.weight"],
                                params["decoder"]["stack"]["layers"]["mlp"]["down"][0, 2].T)
  np.testing.assert_array_equal(  # The ungated shared expert behind Qwen2-MoE's sigmoid(0).
      tensors["model.layers.0.mlp.shared_expert.down_proj.weight"],
      2 * params["decoder"]["stack"]["layers"]["mlp"]["shared"]["down"]["kernel"][0].T)
  back = hf.tensors_to_params(cfg, tensors)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  tensors["model.layers.0.mlp.shared_expert_gate.weight"][0, 0] = 1.0
  with pytest.raises(hf.ExportError, match="shared_expert_gate.weight is not zero"):
    hf.tensors_to_params(cfg, tensors)
