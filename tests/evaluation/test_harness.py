"""The lm-eval adapter equals the project's own loss, runs local tasks, and agrees with lm-eval's hf."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import lm_eval  # pylint: disable=g-import-not-at-top
from lm_eval import utils as lm_eval_utils  # pylint: disable=g-import-not-at-top
from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from tests import cpu_env  # pylint: disable=g-import-not-at-top
from tests.evaluation import common  # pylint: disable=g-import-not-at-top
from yocou_jax import loss as loss_lib  # pylint: disable=g-import-not-at-top
from yocou_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
from yocou_jax.export import exporter  # pylint: disable=g-import-not-at-top
from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top
from yocou_jax.inference import text  # pylint: disable=g-import-not-at-top
from yocou_jax.model import Model  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS_DIR = os.path.join(REPO, "tests", "evaluation", "lm_eval_tasks")
MAX_LENGTH = 24  # < some requests: left truncation is exercised.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A transformer and a yocou checkpoint on disk (training length 32), loaded."""
  out = {}
  for arch in ("transformer", "yocou"):
    workdir = str(tmp_path_factory.mktemp(arch))
    common.write_run(workdir, arch)
    out[arch] = (workdir, text.load_run(workdir))
  return out


@pytest.fixture(autouse=True)
def _offline_hf_home(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.chdir(REPO)  # The task YAMLs' data_files are relative to the repository.


def _lm(run, **kwargs):
  return harness.YocouJaxLM(run=run, show_progress=False, **kwargs)


def _loss_sum_and_greedy(cfg, params, tokens, num_scored):
  """The project's loss (loss.cross_entropy) summed over the last num_scored tokens.

  Rows are right-padded to one length (causal: padding cannot change earlier logits), so the
  training forward compiles once per arch.
  """
  n = len(tokens) - 1
  padded = np.zeros((1, MAX_LENGTH + 1), np.int32)
  padded[0, :len(tokens)] = tokens
  logits = common.forward(cfg)(params, jnp.asarray(padded[:, :-1]))
  weights = np.zeros((1, MAX_LENGTH), np.float32)
  weights[0, n - num_scored:n] = 1
  _, aux = loss_lib.cross_entropy(logits, jnp.asarray(padded[:, 1:]), jnp.asarray(weights))
  hits = np.asarray(jnp.argmax(logits[0], -1))[n - num_scored:n] == padded[0, n - num_scored + 1:
                                                                           n + 1]
  return float(aux["loss_sum"]), bool(hits.all())


@pytest.mark.parametrize("arch", ["transformer", "yocou"])
def test_loglikelihood_equals_project_loss(runs, arch):
  _, run = runs[arch]
  lm = _lm(run, max_length=MAX_LENGTH)
  tok = run.tokenizer
  pairs = [("import os\nimport", " sys"), ("", "def f(x):"), ("x = 1 ", "+ 2"),
           ("for i in range(10):\n    print(i)\n" * 2, "\nreturn None")]
  got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                         disable_tqdm=True)
  for (context, continuation), (logprob, is_greedy) in zip(pairs, got):
    spaces = len(context) - len(context.rstrip())  # lm-eval moves them to the continuation.
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + (
        continuation)
    context_ids = tok.encode(context) if context else [tok.bos_id]
    tokens = (context_ids + tok.encode(continuation))[-(MAX_LENGTH + 1):]
    loss_sum, want_greedy = _loss_sum_and_greedy(run.model_cfg, run.params, tokens,
                                                 len(tok.encode(continuation)))
    assert logprob == pytest.approx(-loss_sum, abs=1e-4)
    assert is_greedy == want_greedy
  assert not any(g for _, g in got)
  # One request per batch (other shapes, no padding rows) gives the same numbers.
  single = _lm(run, max_length=MAX_LENGTH, token_budget=64).loglikelihood(
      [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
  np.testing.assert_allclose(np.asarray(single), np.asarray(got), rtol=0, atol=1e-5)
  # The model's own greedy continuation of a prompt is "greedy"; one token changed is not.
  prompt = tok.encode("def ")
  greedy = engine_lib.Engine(run.model_cfg).generate(run.params, [prompt], 4).tokens[0]
  other = greedy[:2] + [(greedy[2] + 1) % run.model_cfg.vocab_size] + greedy[3:]
  got = lm._loglikelihood_tokens([(("def ", "?"), prompt, greedy), (("def ", "?"), prompt, other)])
  assert [g for _, g in got] == [True, False]
  assert got[0][0] == pytest.approx(-_loss_sum_and_greedy(run.model_cfg, run.params,
                                                          prompt + greedy, 4)[0], abs=1e-4)


def test_rolling_and_generation(runs):
  _, run = runs["yocou"]
  tok = run.tokenizer
  short, long = "def f(x):\n    return x\n", "import os\nimport sys\n" * 4  # 23 and 84 bytes.
  lm = _lm(run, max_length=MAX_LENGTH)
  got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (s,), i)
                                  for i, s in enumerate((short, long))], disable_tqdm=True)
  # A document that fits: every token given all before it, after BOS.
  ids = tok.encode(short)
  assert got[0] == pytest.approx(-_loss_sum_and_greedy(run.model_cfg, run.params,
                                                       [tok.bos_id] + ids, len(ids))[0], abs=1e-4)
  # A longer one: lm-eval's disjoint windows, each scored by the project's loss.
  want = 0.0
  for context, continuation in map(lm_eval_utils.make_disjoint_window,
                                   lm_eval_utils.get_rolling_token_windows(
                                       tok.encode(long), tok.bos_id, MAX_LENGTH, 1)):
    want -= _loss_sum_and_greedy(run.model_cfg, run.params, context + continuation,
                                 len(continuation))[0]
  assert got[1] == pytest.approx(want, abs=1e-4)
  # Generation: the engine's greedy tokens, cut at the first stop string.
  contexts = ["def ", "import os\n", "x = (1, 2"]
  gen_kwargs = {"until": ["\n", ")"], "max_gen_toks": 10, "do_sample": False}
  out = lm.generate_until([Instance("generate_until", {}, (c, gen_kwargs), i)
                           for i, c in enumerate(contexts)], disable_tqdm=True)
  engine = engine_lib.Engine(run.model_cfg)
  for context, text_out in zip(contexts, out):
    full = tok.decode(engine.generate(run.params, [tok.encode(context)], 10,
                                      stop_tokens=[tok.eos_id]).tokens[0])
    want = min((full.split(u)[0] for u in gen_kwargs["until"]), key=len)
    assert text_out == want


def _docs(name):
  with open(os.path.join(TASKS_DIR, f"{name}.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _evaluate(model, tasks, **kwargs):
  return lm_eval.simple_evaluate(
      model=model, tasks=tasks, bootstrap_iters=0, log_samples=True,
      task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False), **kwargs)


def test_local_tasks_end_to_end(runs):
  _, run = runs["yocou"]
  lm = _lm(run)
  results = _evaluate(lm, ["toy_mc", "toy_gen", "toy_rolling"])
  res = results["results"]
  assert {k: v["effective"] for k, v in results["n-samples"].items()} == {
      "toy_mc": 6, "toy_gen": 4, "toy_rolling": 2}
  # acc: the argmax of the adapter's own log-likelihoods of the choices.
  docs = _docs("toy_mc")
  lls = lm.loglikelihood([Instance("loglikelihood", {}, (d["question"], c), 0)
                          for d in docs for c in d["choices"]], disable_tqdm=True)
  lls = np.asarray([ll for ll, _ in lls]).reshape(len(docs), 3)
  acc = np.mean(lls.argmax(1) == [d["answer"] for d in docs])
  assert res["toy_mc"]["acc,none"] == pytest.approx(acc, abs=1e-12)
  assert 0.0 <= res["toy_mc"]["acc_norm,none"] <= 1.0 and res["toy_mc"]["acc_stderr,none"] == "N/A"
  gen = _docs("toy_gen")
  outs = lm.generate_until([Instance("generate_until", {}, (d["question"], {
      "until": ["\n"], "max_gen_toks": 12, "do_sample": False}), 0) for d in gen])
  assert res["toy_gen"]["exact_match,none"] == pytest.approx(
      np.mean([o == d["answer"] for o, d in zip(outs, gen)]))
  texts = [d["text"] for d in _docs("toy_rolling")]
  rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0)
                                      for t in texts])
  num_bytes = sum(len(t.encode()) for t in texts)
  assert res["toy_rolling"]["bits_per_byte,none"] == pytest.approx(
      -sum(rolling) / num_bytes / math.log(2), rel=1e-9)
  averages = harness.averages(res, results["n-samples"])
  assert averages["micro_avg_acc"] == pytest.approx(acc)


@pytest.mark.parametrize("arch", ["transformer", "yocou"])
def test_hf_export_through_lm_eval_hf_agrees(runs, arch, tmp_path):
  # The independent path: the same checkpoint exported to Hugging Face (Llama for transformer,
  # the shipped modeling file for yocou) and scored by lm-eval's own torch model class.
  workdir, run = runs[arch]
  export_dir = str(tmp_path / "hf")
  exporter.export_checkpoint(workdir, export_dir)
  tasks = ["toy_mc", "toy_rolling"]
  ours = _evaluate(_lm(run), tasks)
  theirs = _evaluate("hf", tasks, model_args=dict(pretrained=export_dir, dtype="float32",
                                                 device="cpu", trust_remote_code=True))
  for task in tasks:
    for metric, value in ours["results"][task].items():
      if isinstance(value, float):
        assert theirs["results"][task][metric] == pytest.approx(value, rel=1e-3), metric
    got = [s["filtered_resps"] for s in ours["samples"][task]]
    want = [s["filtered_resps"] for s in theirs["samples"][task]]
    flat = lambda xs: np.asarray([x[0] if isinstance(x, (list, tuple)) else x
                                  for r in xs for x in r], np.float64)
    np.testing.assert_allclose(flat(got), flat(want), rtol=0, atol=1e-3)
  assert ours["results"]["toy_mc"]["acc,none"] == theirs["results"]["toy_mc"]["acc,none"]


def test_binary(runs, tmp_path):
  workdir, _ = runs["transformer"]
  out = tmp_path / "harness.json"
  args = ["--tasks=toy_mc", f"--include_path={TASKS_DIR}", "--include_defaults=false"]
  proc = cpu_env.run_module("experiments.eval_harness", f"--workdir={workdir}", *args,
                            f"--json_out={out}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert (result["arch"], result["step"], result["max_length"]) == ("transformer", 5, 32)
  assert result["n-samples"]["toy_mc"]["effective"] == 6
  assert result["averages"]["macro_avg_acc"] == result["results"]["toy_mc"]["acc,none"]
  refusals = [([f"--workdir={tmp_path / 'missing'}", *args], "error: --workdir="),
              ([f"--workdir={workdir}", "--tasks=no_such_task", *args[1:]],
               "error: --tasks: unknown task(s) no_such_task")]
  results = cpu_env.run_cases("experiments.eval_harness", [f for f, _ in refusals], tmp_path)
  for (_, message), result in zip(refusals, results):
    assert result["code"] == 1 and message in result["stderr"].strip().splitlines()[-1], result
