"""A table of bad inputs to every binary: each exits with status 1 and one line naming the cause.

The cases of one binary run in one child process (``tests/reliability/binary_cases.py`` runs the
binary's ``main`` under ``absl.app.run`` per case), so the table costs one interpreter per binary.
"""

import json

import pytest

from tests import cpu_env

ARCHS = ("transformer, yoco, yocou, rins, looped, parscale, yoco_upper_loop, "
         "yoco_upper_loop_nokv")
POSITIVE = "is invalid: must be a positive integer"

# (binary, arguments, the last line it prints to stderr); {run}: a finished tiny run with
# checkpoints at steps 5 and 10, {tmp}: a scratch directory with the files made in `scratch`.
CASES = [
    # --- train: the whole config, checked before anything is built --------------------------
    ("train", ["--config.model.arch=mamba"],
     f"error: config.model.arch='mamba' is invalid: allowed: {ARCHS}"),
    ("train", ["--config.model.window=0"],
     "error: config.model.window=0 is invalid: must be a positive integer (sliding-window length "
     "W)"),
    ("train", ["--config.model.num_kv_heads=3"],
     "error: config.model.num_kv_heads=3 is invalid: must divide num_heads=4"),
    ("train", ["--config.model.d_model=130"],
     "error: config.model.num_heads=4 is invalid: must divide d_model=130"),
    ("train", ["--config.model.head_dim=31"],
     "error: config.model.head_dim=31 is invalid: must be even (rotate-half RoPE)"),
    ("train", ["--config.model.num_layers=3"],
     "error: config.model.num_layers=3 is invalid: must be even and >= 2 for yoco/yocou (half "
     "self-, half cross-decoder)"),
    ("train", ["--config.model.num_iterations=0"],
     "error: config.model.num_iterations=0 is invalid: must be a positive integer"),
    ("train", ["--config.model.arch=rins", "--config.model.num_recursive_layers=9"],
     "error: config.model.num_recursive_layers=9 is invalid: must be in [1, num_layers=4]"),
    ("train", ["--config.model.window=512"],
     "error: config.model.window=512 is invalid: must be <= config.data.seq_len=256 (a longer "
     "window is never trained)"),
    ("train", ["--config.model.dtype=float16"],
     "error: config.model.dtype='float16' is invalid: allowed: float32, bfloat16"),
    ("train", ["--config.model.vocab_size=200"],
     "error: config.model.vocab_size=200 is invalid: must be >= the vocabulary of "
     "config.data.tokenizer='bpe:1024' (1024 ids)"),
    ("train", ["--config.data.tokenizer=bpe:0"],
     "error: config.data.tokenizer='bpe:0' is invalid: 'bpe:N' needs an integer N >= 259 (the "
     "256 byte tokens plus pad, bos and eos)"),
    ("train", ["--config.data.tokenizer=bpe:abc"],
     "error: config.data.tokenizer='bpe:abc' is invalid: 'bpe:N' needs an integer N >= 259 (the "
     "256 byte tokens plus pad, bos and eos)"),
    ("train", ["--config.train.batch_size=6"],
     "error: config.train.batch_size=6 (per microbatch 6) is not divisible by the data-parallel "
     "mesh axes data x fsdp = 8"),
    ("train", ["--config.train.microbatches=3"],
     "error: config.train.batch_size=8 is not divisible by config.train.microbatches=3"),
    ("train", ["--config.train.steps=0"], f"error: config.train.steps=0 {POSITIVE}"),
    ("train", ["--config.train.learning_rate=-0.1"],
     "error: config.train.learning_rate=-0.1 is invalid: must be a positive number"),
    ("train", ["--config.train.schedule=exponential"],
     "error: config.train.schedule='exponential' is invalid: must be one of cosine, linear, "
     "constant"),
    ("train", ["--config.train.b2=1.0"],
     "error: config.train.b2=1.0 is invalid: must be a number in [0, 1)"),
    ("train", ["--config.train.min_lr_ratio=2.0"],
     "error: config.train.min_lr_ratio=2.0 is invalid: must be a number in [0, 1]"),
    ("train", ["--config.train.nonfinite=ignore"],
     "error: config.train.nonfinite='ignore' is invalid: must be one of skip, stop"),
    ("train", ["--config.train.max_skipped_steps=0"],
     f"error: config.train.max_skipped_steps=0 {POSITIVE}"),
    ("train", ["--config.mesh.data=3"],
     "error: config.mesh sizes {'data': 3, 'fsdp': 1, 'tensor': 1} multiply to 3, not the 8 "
     "devices"),
    ("train", ["--config.mesh.fsdp=-1"],
     "error: config.mesh has -1 for ['data', 'fsdp']: at most one axis may be -1"),
    ("train", ["--config.mesh.tensor=0"],
     "error: config.mesh.tensor=0 is invalid: must be a positive size or -1 (the rest of the "
     "devices)"),
    ("train", ["--config.eval.batch_size=4"],
     "error: config.eval.batch_size=4 is not divisible by data x fsdp = 8"),
    ("train", ["--config.checkpoint.keep=0"], f"error: config.checkpoint.keep=0 {POSITIVE}"),
    ("train", ["--config.logging.every_steps=0"],
     f"error: config.logging.every_steps=0 {POSITIVE}"),
    ("train", ["--config.data.seq_len=0"], f"error: config.data.seq_len=0 {POSITIVE}"),
    ("train", ["--config.seed=-1"],
     "error: config.seed=-1 is invalid: must be a non-negative integer"),
    ("train", ["--config.inference.chunk_size=0"],
     f"error: config.inference.chunk_size=0 {POSITIVE}"),
    ("train", ["--config.data.tokenizer={tmp}/missing.json"],
     "error: config.data.tokenizer='{tmp}/missing.json' is invalid: no such file or directory "
     "(allowed: 'byte', 'bpe:N', a .model or tokenizer.json file, a directory)"),
    ("train", ["--config.data.tokenizer={tmp}/garbage.json"],
     "error: config.data.tokenizer='{tmp}/garbage.json' cannot be loaded (Exception: expected "
     "ident at line 1 column 2)"),
    ("train", ["--config.data.tfds_name=text_files"],
     "error: config.data.text_glob=None is invalid: tfds_name='text_files' needs a directory or "
     "glob of text files"),
    # Two bad fields: both reported, one line each (the last is checked here, the first below).
    ("train", ["--config.train.steps=0", "--config.model.window=0"],
     "error: config.model.window=0 is invalid: must be a positive integer (sliding-window length "
     "W)"),
    ("train", ["--workdir={tmp}/a_file/run"],
     "error: --workdir={tmp}/a_file/run cannot be created: Not a directory"),
    ("train", ["--config.data.tfds_name=text_files", "--config.data.text_glob={tmp}/no_such/*.py",
               "--config.data.tfds_data_dir={tmp}/tfds"],
     "error: bad training data (ValueError): text_files: no files match "
     "text_glob='{tmp}/no_such/*.py'."),
    ("train", ["--config.data.tfds_name=text_files", "--config.data.text_glob={tmp}/empty_files",
               "--config.data.tfds_data_dir={tmp}/tfds"],
     ["error: bad training data (ValueError):", "no usable text under", "empty_files"]),
    ("train", ["--config.data.tfds_name=text_files", "--config.data.text_glob={tmp}/corpus",
               "--config.data.tfds_data_dir={tmp}/tfds", "--config.data.eval_split=test"],
     ["error: bad training data (ValueError):", "'test'"]),
    ("train", ["--config.data.tfds_name=no_such_dataset", "--config.data.tfds_data_dir={tmp}/tfds"],
     ["error: bad training data (ValueError):", "no_such_dataset"]),
    # --- plan ----------------------------------------------------------------------------
    ("plan", ["--config.model.arch=mamba"],
     f"error: config.model.arch='mamba' is invalid: allowed: {ARCHS}"),
    ("plan", ["--contexts=4096,abc"],
     "error: --contexts item 'abc' is invalid: must be a positive integer"),
    ("plan", ["--contexts=0"], "error: --contexts item '0' is invalid: must be a positive integer"),
    ("plan", ["--archs=yocou,mamba"],
     f"error: --archs item 'mamba' is invalid: allowed: {ARCHS}"),
    ("plan", ["--config.train.batch_size=0"], f"error: config.train.batch_size=0 {POSITIVE}"),
    # --- compile_for ---------------------------------------------------------------------
    ("compile_for", ["--mesh=data:2,pipeline:2"],
     "error: --mesh item 'pipeline:2' is invalid: expected AXIS:SIZE with AXIS one of ('data', "
     "'fsdp', 'tensor')"),
    ("compile_for", ["--config.model.num_kv_heads=3"],
     "error: config.model.num_kv_heads=3 is invalid: must divide num_heads=4"),
    ("compile_for", ["--config.train.microbatches=0"],
     f"error: config.train.microbatches=0 {POSITIVE}"),
    # --- generate ------------------------------------------------------------------------
    ("generate", ["--workdir={tmp}/no_run", "--prompt=x"],
     "error: --workdir={tmp}/no_run is not a directory"),
    ("generate", ["--workdir={run}", "--prompt=x", "--temperature=-1"],
     "error: --temperature=-1.0 must be >= 0"),
    ("generate", ["--workdir={run}", "--prompt=x", "--top_p=1.5"],
     "error: --top_p=1.5 must be in (0, 1]"),
    ("generate", ["--workdir={run}", "--prompt=x", "--top_k=-2"],
     "error: --top_k=-2 must be >= 0"),
    ("generate", ["--workdir={run}", "--prompt=x", "--max_new_tokens=0"],
     "error: --max_new_tokens=0 must be a positive integer"),
    ("generate", ["--workdir={run}", "--prompt_file={tmp}/missing.txt"],
     "error: --prompt_file={tmp}/missing.txt does not exist"),
    ("generate", ["--workdir={run}"],
     "error: give --prompt (one or more), --prompt_file or --prompts_file"),
    ("generate", ["--workdir={run}", "--prompts_file={tmp}/prompts.jsonl"],
     "error: per-request max_new_tokens in --prompts_file needs --rows"),
    ("generate", ["--workdir={run}", "--prompt=x", "--step=7"],
     "error: step 7 is not in {run}/checkpoints; saved steps: [5, 10]"),
    ("generate", ["--workdir={tmp}", "--prompt=x"],
     "error: no checkpoint in {tmp}: {tmp}/checkpoints does not exist"),
    ("generate", ["--workdir={run}", "--prompt=x", "--mesh=dp:2"],
     "error: --mesh item 'dp:2' is invalid: expected AXIS:SIZE with AXIS one of ('data', "
     "'fsdp', 'tensor')"),
    ("generate", ["--workdir={run}", "--prompt=x", "--mesh=data:3"],
     "error: --mesh=data:3: mesh sizes {'data': 3, 'fsdp': 1, 'tensor': 1} multiply to "
     "3, not the 8 devices"),
    ("generate", ["--workdir={run}", "--prompt=x", "--mesh=tensor:8"],
     ["error: --mesh=tensor:8: ", "is not divisible by mesh axes ('tensor',) (size 8)"]),
    ("generate", ["--workdir={run}", "--prompt=x", "--prompt=y", "--prompt=z",
                  "--mesh=data:-1,tensor:2"],
     "error: --mesh=data:-1,tensor:2 splits the batch 4 ways (data x fsdp): the number of "
     "prompts (3) must be a multiple of 4"),
    ("generate", ["--workdir={run}", "--prompts_file={tmp}/prompts.jsonl", "--rows=2",
                  "--mesh=fsdp:8"],
     "error: --mesh=fsdp:8 splits the batch 8 ways (data x fsdp): --rows=2 must be a multiple "
     "of 8"),
    # --- export --------------------------------------------------------------------------
    ("export", ["--workdir={run}", "--out={tmp}/out", "--step=7"],
     "error: step 7 is not in {run}/checkpoints; saved steps: [5, 10]"),
    ("export", ["--workdir={tmp}", "--out={tmp}/out"],
     "error: no checkpoint in {tmp}: {tmp}/checkpoints does not exist"),
    # --- import_hf -----------------------------------------------------------------------
    ("import_hf", ["--hf_dir={tmp}/no_hf", "--workdir={tmp}/imported"], ["error:", "no_hf"]),
    ("import_hf", ["--hf_dir={tmp}", "--workdir={tmp}/imported"], ["error:", "config.json"]),
]
# A message given as a list (it comes partly from a library: TFDS, Hugging Face) is the words
# the last line must contain.
MULTI_ERROR_CASE = [i for i, c in enumerate(CASES) if c[1] == ["--config.train.steps=0",
                                                            "--config.model.window=0"]][0]


def scratch(tmp) -> None:
  (tmp / "a_file").write_text("not a directory")
  (tmp / "garbage.json").write_text("this is not JSON")
  (tmp / "empty_files").mkdir()
  (tmp / "corpus").mkdir()
  for i in range(40):
    (tmp / "corpus" / f"m{i}.py").write_text(f"def f{i}(x):\n  return x + {i}\n" * 20)
  for i in range(3):
    (tmp / "empty_files" / f"f{i}.py").write_text("")
  (tmp / "prompts.jsonl").write_text('{"prompt": "def f", "max_new_tokens": 5}\n'
                                     '{"prompt": "x", "max_new_tokens": 2}\n')


@pytest.fixture(scope="module")
def outcomes(run10, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bad_inputs")
  scratch(tmp)
  fill = lambda s: s.replace("{run}", run10[0]).replace("{tmp}", str(tmp))
  results = {}
  for binary in dict.fromkeys(c[0] for c in CASES):
    indices = [i for i, c in enumerate(CASES) if c[0] == binary]
    args = [[fill(a) for a in CASES[i][1]] for i in indices]
    if binary == "train":  # Each case its own workdir, so none sees another's files.
      args = [a if any(x.startswith("--workdir") for x in a) else
              [*a, f"--workdir={tmp}/train{i}"] for i, a in zip(indices, args)]
    cases_json, out_json = tmp / f"{binary}.cases.json", tmp / f"{binary}.out.json"
    cases_json.write_text(json.dumps(args))
    proc = cpu_env.run_module("tests.reliability.binary_cases", f"experiments.{binary}",
                              str(cases_json), str(out_json), device_count=8, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, result in zip(indices, json.loads(out_json.read_text())):
      results[i] = result
  return results, fill


def test_table_is_large_and_covers_every_binary():
  assert len(CASES) >= 40
  assert {c[0] for c in CASES} == {"train", "plan", "compile_for", "generate", "export",
                                   "import_hf"}


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c[0]}:{' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input_exits_1_with_one_line(outcomes, index):
  results, fill = outcomes
  _, _, message = CASES[index]
  result = results[index]
  lines = [l for l in result["stderr"].splitlines() if l.strip()]
  assert result["code"] == 1, result
  assert lines, result
  if isinstance(message, str):
    assert lines[-1] == fill(message)
  else:
    assert all(fill(word) in lines[-1] for word in message), lines[-1]
  assert "Traceback" not in result["stderr"]


def test_every_error_of_a_config_is_reported(outcomes):
  results, _ = outcomes
  lines = results[MULTI_ERROR_CASE]["stderr"].strip().splitlines()
  assert lines[-2:] == [
      "error: config.train.steps=0 is invalid: must be a positive integer",
      "error: config.model.window=0 is invalid: must be a positive integer (sliding-window "
      "length W)"]
