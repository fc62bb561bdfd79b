"""Plans a model before training it: parameters, training FLOPs, KV cache, prefill and decode cost.

  python -m experiments.plan --config=experiments/configs/yocou_1p3b.py \
      --archs=transformer,yoco,yocou,rins,looped --contexts=8192,32768,262144 --json_out=/tmp/p.json

Everything comes from abstract shapes (``yocou_jax.accounting``): nothing is allocated, so a 10B
config plans in seconds on a laptop. ``--archs`` plans each arch with the config's dims (and the
config's T for every looped arch); ``ARCH:K`` sets the arch's own scale knob for its column:
T (``num_iterations``) for the looped archs, P (``num_streams``) for parscale. The paper's
Table 3 line-up (looped twice, ParScale at P = 2)::

  python -m experiments.plan --config=experiments/configs/yocou_1p3b.py \
      --archs=transformer,yoco,yocou,rins,looped:2,parscale:2,yoco_upper_loop,yoco_upper_loop_nokv
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from yocou_jax import accounting
from yocou_jax import validation
from yocou_jax.config import ARCHS, ConfigError, ModelConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.")
_CONTEXTS = flags.DEFINE_list(
    "contexts", ["8192", "32768", "262144"], "Context lengths for the KV cache, prefill, decode.")
_ARCHS = flags.DEFINE_list(
    "archs", [], "Archs to plan side by side with the config's dims (default: config.model.arch); "
    "ARCH:K sets T (looped archs) or P (parscale) for that column.")
# The knob an ``ARCH:K`` item sets.
_SCALE_FIELD = {"parscale": "num_streams", **{arch: "num_iterations" for arch in (
    "yocou", "rins", "looped", "yoco_upper_loop", "yoco_upper_loop_nokv")}}
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the plan(s) here as JSON.")


def parse_arch(item: str) -> tuple[str, dict[str, int]]:
  """``ARCH`` or ``ARCH:K`` -> (arch, model field overrides)."""
  arch, _, scale = item.partition(":")
  if arch not in ARCHS:
    raise ConfigError(f"--archs item {item!r} is invalid: allowed: {', '.join(ARCHS)}")
  if not scale:
    return arch, {}
  if arch not in _SCALE_FIELD or not scale.isdigit() or int(scale) <= 0:
    raise ConfigError(f"--archs item {item!r} is invalid: ARCH:K takes a positive K for "
                      f"{', '.join(_SCALE_FIELD)}")
  return arch, {_SCALE_FIELD[arch]: int(scale)}


def build_plans(config: Any, archs: Sequence[str], contexts: Sequence[int]) -> dict[str, Any]:
  """{item: accounting.plan(...)} for each ``ARCH[:K]`` item (the config's arch when empty)."""
  cfg = ModelConfig.from_config(config.model)
  plans = {}
  for item in archs or [cfg.arch]:
    arch, overrides = parse_arch(item)
    plans[item] = accounting.plan(cfg.replace(arch=arch, **overrides), config.data.seq_len,
                                  config.train.batch_size, contexts)
  return plans


def parse_contexts(values: Sequence[str]) -> list[int]:
  contexts = []
  for value in values:
    if not value.strip().isdigit() or int(value) <= 0:
      raise ConfigError(f"--contexts item {value!r} is invalid: must be a positive integer")
    contexts.append(int(value))
  return contexts


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    validation.validate(_CONFIG.value, check_data=False)
    contexts = parse_contexts(_CONTEXTS.value)
    for item in _ARCHS.value:
      parse_arch(item)
    plans = build_plans(_CONFIG.value, _ARCHS.value, contexts)
  except ConfigError as e:
    raise SystemExit(validation.error_lines(e)) from None
  print(accounting.format_table(plans))
  if _JSON_OUT.value:
    payload = plans if _ARCHS.value else next(iter(plans.values()))
    with open(_JSON_OUT.value, "w") as f:
      json.dump(payload, f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
