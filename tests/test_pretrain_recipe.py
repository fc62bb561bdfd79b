"""experiments/configs/pretrain_mixture.py: the recipe's mixture over a root, on the 1.3B model."""

import math
import re

from experiments.configs import pretrain_mixture, yocou_1p3b
from yocou_jax import validation


def parse(spec: str) -> list[dict]:
  return [dict(field.split("=", 1) for field in source.split(",")) for source in spec.split(";")]


def test_sources_sit_under_the_root_with_the_mixture_weights():
  config = pretrain_mixture.get_config("gs://my-bucket/corpora/")
  train, held_out = parse(config.data.sources), parse(config.data.eval_sources)
  assert [s["name"] for s in train] == [s["name"] for s in held_out] == ["web", "code", "math"]
  assert [s["kind"] for s in train] == ["parquet", "parquet", "jsonl"]
  assert train[0]["path"] == "gs://my-bucket/corpora/fineweb_edu/train/*.parquet"
  assert held_out[2]["path"] == "gs://my-bucket/corpora/open_web_math/validation/*.jsonl.zst"
  assert train[1]["text_key"] == "content"
  assert math.isclose(sum(float(s["weight"]) for s in train), 1.0)
  # No separator inside a field: 5 fields per source.
  assert len(re.split("[,;]", config.data.sources)) == 5 * len(train)


def test_the_model_is_the_1p3b_comparison_and_the_config_validates():
  config = pretrain_mixture.get_config()
  assert config.model.to_dict() == yocou_1p3b.get_config().model.to_dict()
  validation.validate(config, check_data=False)
