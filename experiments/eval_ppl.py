r"""Long-context perplexity: the last 512 tokens of each document as the visible prefix grows.

  python -m experiments.eval_ppl --workdir=runs/yocou,runs/transformer --corpus=code \
      --prefix_lengths=2048,4096,8192 --json_out=ppl.json --png_out=ppl.png

For each prefix length N the model reads the last N tokens of a window of max(N) tokens of each
document and the last ``--target_len`` are scored: the same tokens at every N, in the same
documents (shorter documents are skipped and counted). ``--corpus`` is ``code`` (the held-out
split of the run's training corpus), ``book`` (the Python Language Reference, one long prose
document) or a file, directory or glob. Prefixes may exceed the training length; prefill is
chunked (``--chunk_size``), so memory stays bounded. Several workdirs give one line each.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import eval_common

_WORKDIRS = flags.DEFINE_list("workdir", None, "Training run directories (comma-separated).")
_CORPUS = flags.DEFINE_string("corpus", "code", "code, book, or a file, directory or glob.")
_PREFIXES = flags.DEFINE_list("prefix_lengths", ["2048", "4096", "8192"],
                              "Visible tokens per evaluation, the scored ones included.")
_TARGET_LEN = flags.DEFINE_integer("target_len", 512, "Scored tokens at the end of each window.")
_PER_DOC = flags.DEFINE_integer("windows_per_document", 1,
                                "Consecutive windows taken from one long document, at most.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 64, "Windows in all, at most (0: no limit).")
_PNG = flags.DEFINE_string("png_out", None, "Perplexity-vs-prefix plot (PNG).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdirs = eval_common.workdirs(_WORKDIRS)  # Before the (slow) imports: bad flags fail fast.
  from yocou_jax import files  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import perplexity  # pylint: disable=g-import-not-at-top
  from yocou_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  prefixes = eval_common.int_list(_PREFIXES)
  eval_common.fail_on(perplexity.PerplexityError, perplexity.check_lengths, prefixes,
                      _TARGET_LEN.value)
  runs_json = []
  for workdir in workdirs:
    run = eval_common.load_run(workdir)
    texts = eval_common.fail_on(corpus_lib.CorpusError, corpus_lib.load_documents,
                                _CORPUS.value, run.config.data)
    windows = perplexity.make_windows(texts, run.tokenizer, max(prefixes), _PER_DOC.value,
                                      _MAX_WINDOWS.value)
    if not windows.tokens:
      raise SystemExit(f"error: --prefix_lengths: no document of --corpus={_CORPUS.value} has "
                       f"{max(prefixes)} tokens ({windows.skipped} documents, all shorter)")
    model = eval_common.batched_model(run)
    rows = perplexity.last_tokens_perplexity(model, windows, prefixes, _TARGET_LEN.value)
    cfg = run.model_cfg
    print(f"\n{workdir}: {cfg.arch} T={cfg.iterations}, step {run.step}, trained on "
          f"{run.config.data.seq_len}-token rows; corpus {_CORPUS.value}: {windows.documents} "
          f"documents, {len(windows.tokens)} windows of {max(prefixes)} tokens, "
          f"{windows.skipped} shorter documents skipped")
    print(report.format_table(["prefix", "nll", "ppl", "documents", "windows", "tokens"],
                              [[r.prefix, r.nll, r.ppl, r.documents, r.windows, r.tokens]
                               for r in rows]))
    runs_json.append({**eval_common.run_info(workdir, run), "corpus": _CORPUS.value,
                      "target_len": _TARGET_LEN.value, "skipped_documents": windows.skipped,
                      "rows": [vars(r) for r in rows]})
  if eval_common.json_out():
    report.write_json(eval_common.json_out(), {"runs": runs_json})
  if _PNG.value:
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs_json:
      ax.plot([row["prefix"] for row in r["rows"]], [row["ppl"] for row in r["rows"]], "o-",
              label=f"{os.path.basename(os.path.normpath(r['workdir']))} ({r['arch']} "
              f"T={r['num_iterations']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visible prefix (tokens)")
    ax.set_ylabel(f"perplexity of the last {_TARGET_LEN.value} tokens")
    ax.set_title(f"corpus: {_CORPUS.value}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.save_figure(fig, _PNG.value)
    print(f"plot: {_PNG.value}")


if __name__ == "__main__":
  app.run(main)
