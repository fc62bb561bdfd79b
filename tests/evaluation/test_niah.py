"""S-NIAH samples are deterministic and fit their length; RULER's scorer; an oracle scores 1."""

import dataclasses
import json
import re

import numpy as np
import pytest

from tests import cpu_env
from tests.evaluation import common
from yocou_jax.data import tokenizers
from yocou_jax.evaluation import corpus
from yocou_jax.evaluation import niah

TOK = tokenizers.ByteTokenizer()
ENCODE = lambda s: [TOK.bos_id] + TOK.encode(s)
HAYSTACK = niah.Haystack.from_text(corpus.book_text()[:40_000])
GOLDEN = ("A special magic number is hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the number afterwards.\n{context}\nWhat is the special magic "
          "number for {key} mentioned in the provided text? The special magic number for {key} "
          "mentioned in the provided text is")


def _grid(task, seed=0, lengths=(1024, 1536), depths=(0, 50, 100)):
  return niah.generate_samples(task, lengths, depths, 2, ENCODE, HAYSTACK, seed=seed,
                               tokens_to_generate=32)


@pytest.mark.parametrize("task", sorted(niah.TASKS))
def test_samples(task):
  samples = _grid(task)
  assert [dataclasses.asdict(s) for s in samples] == [dataclasses.asdict(s) for s in _grid(task)]
  assert [s.input for s in samples] != [s.input for s in _grid(task, seed=1)]
  kinds = {"s_niah_1": r"\d{7}", "s_niah_2": r"\d{7}", "s_niah_3": r"[0-9a-f-]{36}"}
  for s in samples:
    (value,) = s.outputs
    needle = niah.NEEDLE.format(kind=niah.TASKS[task][1], key=s.key, value=value)
    assert s.input.count(needle) == 1 and s.input.count(value) == 1
    assert s.input.endswith(f"for {s.key} mentioned in the provided text?")
    prompt = ENCODE(s.input + s.answer_prefix)
    # Slack: the key (3 times) differs from the first sample's, plus one noise line.
    slack = 80 + (len(niah.NOISE) + 1 if task == "s_niah_1" else 0)
    assert len(prompt) == s.length and s.max_length - 32 - slack <= s.length <= s.max_length - 32
    assert TOK.decode(prompt[s.token_position_answer:])[:len(value)] == value
    context = s.input.split("\n", 1)[1].rsplit("\n", 1)[0]
    if task == "s_niah_1":  # Line round(n * d / 100) of n noise lines.
      parts = context.split("\n")
      assert parts.index(needle) == round((len(parts) - 1) * s.depth / 100)
    else:  # Sentence int(n * d / 100) of n essay sentences.
      parts = niah.split_sentences(context.replace(needle, " "))
      before = niah.split_sentences(context[:context.index(needle)])
      assert len(before) == int(len(parts) * s.depth / 100)
    assert len(parts) >= 2
    if task != "s_niah_3":
      assert s.input + s.answer_prefix == GOLDEN.format(context=context, key=s.key)
    assert re.fullmatch(kinds[task], value)


def test_scorer_with_planted_answers():
  assert niah.string_match_all(" 4821931.", ["4821931"]) == 1.0
  assert niah.string_match_all("\x00THE ANSWER:\tABC-12\n", ["abc-12"]) == 1.0
  assert niah.string_match_all("48219 31", ["4821931"]) == 0.0
  assert niah.string_match_all("a 1 b", ["1", "2"]) == 0.5
  assert niah.postprocess("  x\x01y\x1fz  ") == "x\ny\nz"


def test_oracle_scores_one_and_constant_zero():
  samples = _grid("s_niah_2")
  lengths, depths = [1024, 1536], [0, 50, 100]
  oracle = niah.evaluate(samples, niah.needle_oracle, lengths, depths)
  np.testing.assert_array_equal(oracle.accuracy, np.ones((2, 3)))
  constant = niah.evaluate(samples, lambda ss: ["1234567"] * len(ss), lengths, depths)
  np.testing.assert_array_equal(constant.accuracy, np.zeros((2, 3)))
  half = niah.evaluate(samples, lambda ss: [o if s.index % 2 else "" for s, o in zip(
      ss, niah.needle_oracle(ss))], lengths, depths)
  np.testing.assert_array_equal(half.accuracy, np.full((2, 3), 0.5))


def test_binary(tmp_path):
  # Greedy decoding through the engine: the recorded predictions equal the model's own greedy
  # continuation of each prompt (engine.generate, one prompt at a time).
  from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  cfg, params = common.write_run(workdir, "yoco")
  out, samples_out = tmp_path / "niah.json", tmp_path / "samples.jsonl"
  args = ["--tasks=s_niah_1,s_niah_3", "--lengths=512", "--depths=0,100", "--num_samples=1",
          "--max_new_tokens=8", "--chunk_size=64"]
  proc = cpu_env.run_module("experiments.eval_niah", f"--workdir={workdir}", *args,
                            f"--json_out={out}", f"--samples_out={samples_out}", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [t["task"] for t in result["tasks"]] == ["s_niah_1", "s_niah_3"]
  assert np.asarray(result["tasks"][0]["accuracy"]).shape == (1, 2)
  rows = [json.loads(line) for line in samples_out.read_text().splitlines()]
  assert len(rows) == 4
  engine = engine_lib.Engine(cfg, engine_lib.Options(chunk_size=64))
  for row in rows[::3]:
    prompt = ENCODE(row["input"] + row["answer_prefix"])
    want = engine.generate(params, [prompt], 8, stop_tokens=[TOK.eos_id]).tokens[0]
    assert row["pred"] == TOK.decode(want) and row["length"] == len(prompt)
  (tmp_path / "blank.txt").write_text("\n")
  missing, blank = cpu_env.run_cases("experiments.eval_niah", [
      [f"--workdir={tmp_path / 'nope'}", *args],
      [f"--workdir={workdir}", *args, f"--haystack={tmp_path / 'blank.txt'}"]], tmp_path)
  assert missing["code"] == 1 and "error: --workdir=" in missing["stderr"].splitlines()[-1]
  assert blank["code"] == 1 and "error: --haystack=" in blank["stderr"].splitlines()[-1]
