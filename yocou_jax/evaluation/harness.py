"""lm-evaluation-harness on the JAX engine: the model class ``yocou_jax``.

  lm_eval --model yocou_jax --model_args workdir=runs/yocou,num_iterations=3 --tasks arc_easy

(after ``import yocou_jax.evaluation.harness``, which registers it; ``experiments/eval_harness``
does that and wraps ``lm_eval.simple_evaluate``). Every arch of the framework is served by the
same code: requests become :class:`batched.ScoreRequest` s or generation prompts, which
:class:`batched.BatchedModel` sorts and pads into a few fixed shapes.

Tokenisation follows lm-eval's ``hf`` model with its defaults, so both give the same numbers on
an exported checkpoint: no BOS is added to contexts (``add_bos_token=True`` adds one), an empty
context is the BOS token (``prefix_token_id``), and contexts are left-truncated to
``max_length`` (default: the run's training length).
"""

from __future__ import annotations

import collections
import json
from typing import Any, Optional

from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils

from yocou_jax.evaluation import batched
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.inference import text

DEFAULT_MAX_GEN_TOKS = 256


@register_model("yocou_jax")
class YocouJaxLM(TemplateLM):
  """A training run's checkpoint as an lm-eval model (loglikelihood, rolling, generate_until)."""

  def __init__(self, workdir: Optional[str] = None, num_iterations: int = 0,
               step: Optional[int] = None, max_length: int = 0,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, chunk_size: int = 512,
               token_budget: int = 32768, add_bos_token: bool = False, seed: int = 0,
               batch_size: Any = None, max_batch_size: Any = None, device: Any = None,
               run: Optional[text.Run] = None, show_progress: bool = True):
    """
    Args:
      workdir: the training run (latest checkpoint, or ``step``); or pass a loaded ``run``.
      num_iterations: loop count T at evaluation (0: as trained).
      step: checkpoint step (default: the latest).
      max_length: longest sequence fed (default: the run's ``data.seq_len``).
      max_gen_toks: generation budget when a task gives none.
      chunk_size, token_budget: see :class:`batched.BatchedModel`.
      add_bos_token: prepend BOS to every context.
      seed: PRNG seed of sampled generations (``do_sample=True``).
      batch_size, max_batch_size, device: accepted for the harness and ignored (batches are
        sized by ``token_budget``; devices are JAX's).
      run: an already loaded run (instead of ``workdir``).
      show_progress: progress lines with ETA on stderr.
    """
    super().__init__()
    del batch_size, max_batch_size, device
    if run is None:
      if not workdir:
        raise ValueError("model_args: give workdir=DIR")
      run = text.load_run(workdir, None if step in (None, "") else int(step), int(num_iterations))
    self.run, self.tokenizer = run, run.tokenizer
    self._max_length = int(max_length) or int(run.config.data.seq_len)
    self.max_gen_toks, self.add_bos_token = int(max_gen_toks), bool(add_bos_token)
    self.seed = int(seed)
    self.model = batched.BatchedModel(run.model_cfg, run.params, chunk_size=int(chunk_size),
                                      token_budget=int(token_budget),
                                      show_progress=show_progress)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_id
    return self.eot_token_id if bos is None else bos

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    ids = self.tokenizer.encode(string)
    return [self.tokenizer.bos_id] + ids if add and self.tokenizer.bos_id is not None else ids

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  # --- log-likelihoods -------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """``((context, continuation), context_ids, continuation_ids)`` -> (sum logp, is_greedy)."""
    score_requests = []
    for _, context_ids, continuation_ids in requests:
      whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
      first = max(len(whole) - len(continuation_ids), 1)
      score_requests.append(batched.ScoreRequest(whole, first))
    scores = self.model.score(score_requests, label="loglikelihood")
    results = [(s.total, s.greedy) for s in scores]
    for (pair, _, _), result in zip(requests, results):
      if pair is not None and pair[0] is not None:
        self.cache_hook.add_partial("loglikelihood", pair, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihoods over lm-eval's disjoint rolling windows."""
    windows, owners = [], []
    for i, request in enumerate(requests):
      (string,) = request.args
      for window in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append(((None, None), *window))
        owners.append(i)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[owner] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # --- generation ------------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled) continuations, cut at the first stop string."""
    groups = collections.defaultdict(list)
    for i, request in enumerate(requests):
      groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
    outputs: list[str] = [""] * len(requests)
    for indices in groups.values():
      gen_kwargs = model_utils.normalize_gen_kwargs(requests[indices[0]].args[1],
                                                    self.max_gen_toks)
      until = model_utils.handle_stop_sequences(gen_kwargs.get("until"), eos=None)
      max_new = int(gen_kwargs["max_gen_toks"])
      sampling = sampling_lib.SamplingConfig(
          temperature=float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get(
              "do_sample") else 0.0)
      keep = max(self.max_length - max_new, 1)
      prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id]
                 for i in indices]

      def stop_when(_, tokens, until=until):
        return any(u in self.tokenizer.decode(tokens) for u in until)

      continuations = self.model.generate(prompts, max_new, stop_tokens=[self.eot_token_id],
                                          stop_when=stop_when if until else None,
                                          sampling=sampling, seed=self.seed,
                                          label="generate_until")
      for i, tokens in zip(indices, continuations):
        out = self.tokenizer.decode(tokens)
        for u in until:
          out = out.split(u)[0]
        outputs[i] = out
        self.cache_hook.add_partial("generate_until", requests[i].args, out)
    return outputs


def averages(results: dict[str, Any], n_samples: dict[str, Any]) -> dict[str, float]:
  """Macro (per task) and micro (per sample) averages of every numeric metric over tasks."""
  sums = collections.defaultdict(list)
  for task, metrics in results.items():
    n = n_samples.get(task, {}).get("effective", 0)
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and "_stderr" not in key and "," in key:
        sums[key.split(",")[0]].append((float(value), n))
  out = {}
  for metric, values in sums.items():
    out[f"macro_avg_{metric}"] = sum(v for v, _ in values) / len(values)
    total = sum(n for _, n in values)
    if total:
      out[f"micro_avg_{metric}"] = sum(v * n for v, n in values) / total
  return out
