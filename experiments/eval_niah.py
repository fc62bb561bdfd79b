r"""Needle in a haystack: RULER's S-NIAH-1/2/3, generated locally, greedy decoding, RULER scoring.

  python -m experiments.eval_niah --workdir=runs/yocou --tasks=s_niah_1,s_niah_2,s_niah_3 \
      --lengths=1024,2048,4096 --depths=0,25,50,75,100 --num_samples=4 \
      --json_out=niah.json --png_out=niah.png --samples_out=niah.jsonl

Samples are drawn deterministically from ``--seed`` (``--samples_out`` writes them as RULER's
JSONL fields), prompts are ``input + answer_prefix`` with BOS, the engine decodes greedily up
to ``--max_new_tokens`` (RULER: 128) or EOS, and a prediction scores 1 when it contains the
needle's value. Prints an accuracy table per task (length x depth) and draws a heatmap per task.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import eval_common

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_TASKS = flags.DEFINE_list("tasks", ["s_niah_1", "s_niah_2", "s_niah_3"], "Tasks to run.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"],
                             "max_length of the prompts (prompt + max_new_tokens), in tokens.")
_DEPTHS = flags.DEFINE_list("depths", [str(d) for d in range(0, 101, 10)],
                            "Needle depths, percent of the haystack before it.")
_SAMPLES = flags.DEFINE_integer("num_samples", 10, "Samples per (task, length, depth).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sample grid.")
_HAYSTACK = flags.DEFINE_string("haystack", "book",
                                "Essay haystack: book (the Python Language Reference) or a path.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens decoded per prompt (RULER: 128).")
_SAMPLES_OUT = flags.DEFINE_string("samples_out", None, "Write the samples as JSONL here.")
_PNG = flags.DEFINE_string("png_out", None, "Accuracy heatmaps (PNG).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  (workdir,) = eval_common.workdirs(_WORKDIR)  # Before the (slow) imports: bad flags fail fast.
  from yocou_jax import files  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import niah  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  lengths, depths = eval_common.int_list(_LENGTHS), eval_common.int_list(_DEPTHS, minimum=0)
  unknown = [t for t in _TASKS.value if t not in niah.TASKS]
  if unknown or not _TASKS.value:
    raise SystemExit(f"error: --tasks={','.join(_TASKS.value)}: allowed {', '.join(niah.TASKS)}")
  if _MAX_NEW.value < 1 or _SAMPLES.value < 1:
    raise SystemExit("error: --max_new_tokens and --num_samples must be >= 1")
  texts = eval_common.fail_on(corpus_lib.CorpusError, corpus_lib.load_documents,
                              _HAYSTACK.value, None, "--haystack")
  haystack = eval_common.fail_on(niah.NiahError, niah.Haystack.from_text, "\n".join(texts))
  run = eval_common.load_run(workdir)
  tok = run.tokenizer
  bos = [tok.bos_id] if tok.bos_id is not None else []
  encode = lambda s: bos + tok.encode(s)
  model = eval_common.batched_model(run)
  results, all_samples = [], []
  for task in _TASKS.value:
    samples = eval_common.fail_on(niah.NiahError, niah.generate_samples, task, lengths, depths,
                                  _SAMPLES.value, encode, haystack, seed=_SEED.value,
                                  tokens_to_generate=_MAX_NEW.value)
    predict = niah.model_predictor(model, tok, _MAX_NEW.value, label=task)
    results.append(niah.evaluate(samples, predict, lengths, depths))
    all_samples += samples
  cfg = run.model_cfg
  print(f"\n{workdir}: {cfg.arch} T={cfg.iterations}, step {run.step}, trained on "
        f"{run.config.data.seq_len}-token rows; {_SAMPLES.value} samples per cell, "
        f"seed {_SEED.value}, haystack {_HAYSTACK.value}")
  for r in results:
    print(f"\n{r.task}: accuracy by length (rows) and depth % (columns)")
    print(report.format_table(["length", *map(str, depths), "mean"],
                              [[n, *map(float, row), m]
                               for n, row, m in zip(lengths, r.accuracy, r.per_length)]))
  print("\n" + report.format_table(["task", *map(str, lengths), "mean"],
                                   [[r.task, *r.per_length, r.mean] for r in results]))
  if _SAMPLES_OUT.value:
    with files.atomic_write(_SAMPLES_OUT.value) as f:
      for s, p in zip(all_samples, [p for r in results for p in r.predictions]):
        f.write(json.dumps({**vars(s), "pred": p}) + "\n")
  if eval_common.json_out():
    report.write_json(eval_common.json_out(), {
        **eval_common.run_info(workdir, run), "seed": _SEED.value, "haystack": _HAYSTACK.value,
        "num_samples": _SAMPLES.value, "max_new_tokens": _MAX_NEW.value,
        "tasks": [{"task": r.task, "lengths": lengths, "depths": depths,
                   "accuracy": r.accuracy.tolist(), "per_length": r.per_length, "mean": r.mean}
                  for r in results]})
  if _PNG.value:
    plt = files.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results) + 1, 3.8),
                             squeeze=False, constrained_layout=True)
    for ax, r in zip(axes[0], results):
      image = ax.imshow(r.accuracy.T, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto",
                        origin="lower")
      ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
      ax.set_yticks(range(len(depths)), [str(d) for d in depths])
      ax.set_xlabel("length (tokens)")
      if ax is axes[0][0]:
        ax.set_ylabel("needle depth (%)")
      ax.set_title(f"{r.task}: mean {r.mean:.2f}")
    fig.colorbar(image, ax=axes[0].tolist())
    fig.suptitle(f"{cfg.arch} T={cfg.iterations}")
    files.save_figure(fig, _PNG.value)
    print(f"heatmap: {_PNG.value}")


if __name__ == "__main__":
  app.run(main)
