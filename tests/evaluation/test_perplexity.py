"""Last-token perplexity equals the training forward's loss on the same tokens, at any prefix."""

import math

import numpy as np
import pytest

from tests import cpu_env
from tests.evaluation import common
from tests.inference import reference as ref_lib
from yocou_jax.data import tokenizers
from yocou_jax.evaluation import batched
from yocou_jax.evaluation import perplexity


@pytest.mark.parametrize("arch", ["transformer", "yoco", "yocou"])
def test_last_tokens_nll_equals_forward_loss(arch):
  # Prefixes 24, 40 and 56 with 16 scored tokens, chunks of 8: prefix chunks skip the head.
  cfg = ref_lib.tiny(arch, vocab_size=384)  # The byte tokenizer's ids.
  params = ref_lib.random_params(cfg, seed=2)
  rng = np.random.default_rng(3)
  texts = ["".join(rng.choice(list("abcdefgh"), size=n)) for n in (70, 10, 120, 54)]
  windows = perplexity.make_windows(texts, tokenizers.ByteTokenizer(), 56,
                                    windows_per_document=2)
  # 72, 12, 122 and 56 tokens with BOS/EOS: windows 1 + 0 + 2 + 1; the short one is skipped.
  assert (len(windows.tokens), windows.documents, windows.skipped) == (4, 3, 1)
  model = batched.BatchedModel(cfg, params, chunk_size=8, show_progress=False)
  rows = perplexity.last_tokens_perplexity(model, windows, [24, 40, 56], target_len=16)
  for row in rows:
    want = [-common.token_logprobs(cfg, params, w[-row.prefix:])[-16:] for w in windows.tokens]
    assert row.nll == pytest.approx(np.mean(want), abs=1e-5)
    assert row.ppl == pytest.approx(math.exp(row.nll), rel=1e-12)
    assert (row.windows, row.documents, row.tokens) == (4, 3, 64)
  # Context matters for random weights: the curve is not flat.
  assert len({round(r.nll, 4) for r in rows}) == 3


def test_bad_lengths_are_refused():
  with pytest.raises(perplexity.PerplexityError, match="--prefix_lengths=512,1024"):
    perplexity.check_lengths([512, 1024], 512)
  with pytest.raises(perplexity.PerplexityError, match="--target_len=0"):
    perplexity.check_lengths([16], 0)


def test_binary_refusals_and_json(tmp_path):
  # Beyond the training length (32 tokens): prefixes 48 and 96 with 16 scored tokens.
  workdir = str(tmp_path / "run")
  cfg, params = common.write_run(workdir, "yocou")
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("x = 1\n" * 30)  # 182 tokens with BOS/EOS.
  (tmp_path / "docs" / "b.txt").write_text("short\n")  # Skipped and counted.
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "blank.txt").write_text("  \n")
  args = ["--prefix_lengths=48,96", "--target_len=16", "--chunk_size=16"]
  out = tmp_path / "ppl.json"
  proc = cpu_env.run_module("experiments.eval_ppl", f"--workdir={workdir}",
                            f"--corpus={tmp_path / 'docs'}", f"--json_out={out}", *args,
                            timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  (run,) = json.loads(out.read_text())["runs"]
  assert (run["arch"], run["step"], run["skipped_documents"]) == ("yocou", 5, 1)
  window = np.asarray(tokenizers.ByteTokenizer().encode("x = 1\n" * 30))[:95]
  window = np.concatenate([[1], window])  # BOS + the first 95 text tokens.
  for row, n in zip(run["rows"], (48, 96)):
    want = -np.mean(common.token_logprobs(cfg, params, window[-n:])[-16:])
    assert (row["prefix"], row["documents"], row["tokens"]) == (n, 1, 16)
    assert row["nll"] == pytest.approx(want, abs=1e-5)
  refusals = [
      ([f"--workdir={tmp_path / 'missing'}"], "error: --workdir="),
      ([f"--workdir={workdir}", f"--corpus={tmp_path / 'empty'}"], "holds no text"),
      ([f"--workdir={workdir}", f"--corpus={tmp_path / 'docs'}", "--prefix_lengths=48,400"],
       "error: --prefix_lengths: no document"),
  ]
  results = cpu_env.run_cases("experiments.eval_ppl", [[*args, *flags] for flags, _ in refusals],
                              tmp_path)
  for (_, message), result in zip(refusals, results):
    assert result["code"] == 1 and message in result["stderr"].strip().splitlines()[-1], result
