r"""lm-evaluation-harness tasks on a training run, through the JAX engine (model ``yocou_jax``).

  python -m experiments.eval_harness --workdir=runs/yocou --tasks=toy_mc,toy_gen \
      --include_path=tests/evaluation/lm_eval_tasks --json_out=harness.json
  python -m experiments.eval_harness --workdir=runs/yocou --tasks=arc_easy,hellaswag \
      --num_fewshot=0 --limit=200   # needs the datasets in the Hugging Face cache

Wraps ``lm_eval.simple_evaluate`` with the adapter of :mod:`yocou_jax.evaluation.harness`
(log-likelihoods and generation in a few fixed shapes). Prints lm-eval's table; ``--json_out``
writes the results, sample counts, versions and macro/micro averages over the tasks.
"""

from __future__ import annotations

from absl import app, flags

from experiments import eval_common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_TASKS = flags.DEFINE_list("tasks", None, "lm-eval task names, groups or YAML paths.")
_INCLUDE = flags.DEFINE_string("include_path", None, "A folder of extra task YAMLs.")
_DEFAULTS = flags.DEFINE_bool("include_defaults", True, "Also index lm-eval's bundled tasks.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
_LIMIT = flags.DEFINE_integer("limit", None, "Documents per task, at most.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Longest sequence fed (0: training length).")
_MAX_GEN = flags.DEFINE_integer("max_gen_toks", 256, "Generation budget when a task gives none.")
_BOS = flags.DEFINE_bool("add_bos_token", False, "Prepend BOS to every context.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap_iters", 0, "Bootstrap samples for stderr (0: none).")
_SEED = flags.DEFINE_integer("seed", 0, "Few-shot sampling and generation seed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import os  # pylint: disable=g-import-not-at-top

  (workdir,) = eval_common.workdirs(_WORKDIR)
  if not _TASKS.value:
    raise SystemExit("error: --tasks is required (task names, groups or YAML paths)")
  if _INCLUDE.value and not os.path.isdir(_INCLUDE.value):
    raise SystemExit(f"error: --include_path={_INCLUDE.value}: no such directory")
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  from yocou_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  task_manager = TaskManager(include_path=_INCLUDE.value, include_defaults=_DEFAULTS.value)
  unknown = [t for t in _TASKS.value
             if not t.endswith(".yaml") and not task_manager.match_tasks([t])]
  if unknown:
    raise SystemExit(f"error: --tasks: unknown task(s) {', '.join(unknown)}; see --include_path "
                     "and `lm_eval ls tasks`")
  run = eval_common.load_run(workdir)
  lm = harness.YocouJaxLM(run=run, max_length=_MAX_LENGTH.value, max_gen_toks=_MAX_GEN.value,
                          add_bos_token=_BOS.value, seed=_SEED.value,
                          **eval_common.batching_kwargs())
  results = lm_eval.simple_evaluate(
      model=lm, tasks=list(_TASKS.value), task_manager=task_manager,
      num_fewshot=_FEWSHOT.value, limit=_LIMIT.value, bootstrap_iters=_BOOTSTRAP.value,
      random_seed=_SEED.value, numpy_random_seed=_SEED.value, fewshot_random_seed=_SEED.value,
      log_samples=False)
  from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top

  cfg = run.model_cfg
  print(f"\n{workdir}: {cfg.arch} T={cfg.iterations}, step {run.step}, max_length "
        f"{lm.max_length}; programs compiled: {len(lm.model.programs)}")
  print(make_table(results))
  averages = harness.averages(results["results"], results.get("n-samples", {}))
  for name, value in sorted(averages.items()):
    print(f"{name}: {value:.4f}")
  if eval_common.json_out():
    report.write_json(eval_common.json_out(), {
        **eval_common.run_info(workdir, run), "max_length": lm.max_length,
        "num_fewshot": _FEWSHOT.value, "limit": _LIMIT.value, "results": results["results"],
        "n-samples": results.get("n-samples"), "versions": results.get("versions"),
        "averages": averages})


if __name__ == "__main__":
  app.run(main)
