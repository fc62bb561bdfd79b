"""Sampling: the filtered distributions against a numpy reference, and empirical frequencies."""

import jax
import numpy as np
import pytest

from yocou_jax.inference import sampling as sampling_lib

LOGITS = np.array([[2.0, 1.0, 0.5, 0.5, -1.0, 3.0, 0.0, -2.0],
                   [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]], np.float32)


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then top-p, on one row, in float64."""
  z = logits.astype(np.float64) / temperature
  keep = np.ones_like(z, bool)
  if top_k:
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-z, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep_sorted = before < top_p
    p2 = np.zeros_like(p)
    p2[order[keep_sorted]] = p[order[keep_sorted]]
    p = p2 / p2.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.8), (1.3, 4, 0.6), (1.0, 0, 1e-3)])
def test_filtered_distribution_matches_reference(temperature, top_k, top_p):
  cfg = sampling_lib.SamplingConfig(temperature, top_k, top_p)
  got = np.asarray(jax.nn.softmax(sampling_lib.filter_logits(LOGITS, cfg), axis=-1))
  for row, probs in zip(LOGITS, got):
    np.testing.assert_allclose(probs, reference_probs(row, temperature, top_k, top_p),
                               rtol=0, atol=1e-6)


def test_greedy_and_empirical_frequencies():
  np.testing.assert_array_equal(
      sampling_lib.sample(LOGITS, jax.random.key(0), sampling_lib.SamplingConfig()), [5, 7])
  cfg = sampling_lib.SamplingConfig(temperature=0.8, top_k=4, top_p=0.9)
  n = 20_000
  draws = np.asarray(sampling_lib.sample(np.repeat(LOGITS[:1], n, 0), jax.random.key(1), cfg))
  freq = np.bincount(draws, minlength=LOGITS.shape[1]) / n
  want = reference_probs(LOGITS[0], 0.8, 4, 0.9)
  np.testing.assert_allclose(freq, want, atol=0.015)
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))


def test_invalid_settings_raise():
  with pytest.raises(ValueError, match="top_p"):
    sampling_lib.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sampling_lib.SamplingConfig(temperature=-1.0)
