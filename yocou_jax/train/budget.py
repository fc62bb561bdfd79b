"""Training budgets: the step count derived from a FLOPs or token budget.

An equal-FLOPs comparison of archs is one config field: ``config.train.flops_budget = C`` gives
every arch ``floor(C / train FLOPs per step)`` steps, the FLOPs per step being the analytic count
of :mod:`yocou_jax.accounting` (training = 3 x forward, loop iterations counted every time they
run). ``config.train.tokens_budget = D`` gives ``floor(D / tokens per step)`` steps. With both set,
the smaller step count wins; with neither, ``config.train.steps`` is used as given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from yocou_jax import accounting
from yocou_jax.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class StepBudget:
  """The resolved step count and where it comes from."""

  steps: int
  decided_by: str  # "steps", "flops_budget" or "tokens_budget".
  flops_per_step: float  # Analytic training FLOPs of one optimizer step.
  tokens_per_step: int

  @property
  def flops(self) -> float:
    """Training FLOPs the run spends (at most the FLOPs budget)."""
    return self.steps * self.flops_per_step

  @property
  def tokens(self) -> int:
    return self.steps * self.tokens_per_step

  def describe(self) -> str:
    return (f"{self.steps} steps decided by config.train.{self.decided_by} "
            f"({self.flops_per_step:.4g} FLOPs and {self.tokens_per_step} tokens per step; "
            f"{self.flops:.4g} training FLOPs, {self.tokens} tokens in all)")


def _budget(train_config: Any, name: str) -> float:
  value = train_config.get(name, 0) or 0
  if value < 0:
    raise ConfigError(f"config.train.{name}={value} must be >= 0 (0 disables it)")
  return float(value)


def resolve_steps(config: Any, model_cfg: ModelConfig | None = None) -> StepBudget:
  """The number of optimizer steps of ``config`` (see the module docstring)."""
  model_cfg = model_cfg or ModelConfig.from_config(config.model)
  t = config.train
  seq_len, batch_size = int(config.data.seq_len), int(t.batch_size)
  flops_per_step = accounting.train_flops_per_step(model_cfg, seq_len, batch_size)
  tokens_per_step = seq_len * batch_size
  candidates = []
  flops_budget, tokens_budget = _budget(t, "flops_budget"), _budget(t, "tokens_budget")
  if flops_budget:
    candidates.append((int(flops_budget // flops_per_step), "flops_budget", flops_budget,
                       f"{flops_per_step:.4g} training FLOPs"))
  if tokens_budget:
    candidates.append((int(tokens_budget // tokens_per_step), "tokens_budget", tokens_budget,
                       f"{tokens_per_step} tokens"))
  if not candidates:
    return StepBudget(int(t.steps), "steps", flops_per_step, tokens_per_step)
  steps, name, value, per_step = min(candidates)
  if steps < 1:
    raise ConfigError(f"config.train.{name}={value:g} is smaller than one step ({per_step} per "
                      "step); raise the budget or lower batch_size/seq_len")
  return StepBudget(steps, name, flops_per_step, tokens_per_step)


def with_resolved_steps(config: Any) -> tuple[Any, StepBudget]:
  """A copy of ``config`` whose ``train.steps`` is the budgeted step count, and the budget."""
  budget = resolve_steps(config)
  resolved = config.copy_and_resolve_references()
  resolved.train.steps = budget.steps
  return resolved, budget
