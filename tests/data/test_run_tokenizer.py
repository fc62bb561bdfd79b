"""Tests of yocou_jax.data.run_tokenizer: "bpe:N" trained once per run, saved whole, read back."""

import os
import shutil
import subprocess
import sys
import sysconfig

import ml_collections
import portpicker
import pytest

from experiments.configs import default
from tests import cpu_env
from yocou_jax import validation
from yocou_jax.data import corpora
from yocou_jax.data import run_tokenizer
from yocou_jax.data import tokenizers

VOCAB_SIZE = 512
SPEC = f"bpe:{VOCAB_SIZE}"

# A child process with another hash seed and one thread, SIGKILLed just before the tokenizer it
# made is renamed into place (argv: workdir, then the data config as key=value pairs).
_KILLED_BEFORE_RENAME = """
import os, signal, sys
import ml_collections
from yocou_jax.data import run_tokenizer
os.rename = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
data = ml_collections.ConfigDict(dict(item.split("=", 1) for item in sys.argv[2:]))
run_tokenizer.prepare(data, sys.argv[1], write=True)
"""

# One of two processes on loopback (argv: port, process id, scratch dir, then the data config):
# each makes the tokenizer in its own workdir (no shared filesystem), process 0 writes it; then
# process 1 alone asks for another vocabulary size, which the fingerprint check must catch.
_TWO_PROCESSES = """
import sys
import jax
import ml_collections
port, process_id, scratch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from yocou_jax.data import run_tokenizer
data = ml_collections.ConfigDict(dict(item.split("=", 1) for item in sys.argv[4:]))
workdir = f"{scratch}/run{process_id}"
tokenizer = run_tokenizer.prepare(data, workdir, write=process_id == 0)
print("same", tokenizer.vocab_size, run_tokenizer.saved_tokenizer_dir(workdir) is not None)
if process_id == 1:
  data.tokenizer = "bpe:300"
try:
  run_tokenizer.prepare(data, f"{scratch}/other{process_id}", write=process_id == 0)
except ValueError as e:
  print("error:", e)
"""


@pytest.fixture(scope="module")
def data_config(tmp_path_factory) -> ml_collections.ConfigDict:
  """`config.data` of a text_files corpus: 24 modules of the standard library (about 300 KB)."""
  root = tmp_path_factory.mktemp("run_tokenizer")
  stdlib = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py")
                 and 2_000 <= os.path.getsize(os.path.join(stdlib, n)) <= 40_000)[:24]
  (root / "corpus").mkdir()
  for name in names:
    shutil.copy(os.path.join(stdlib, name), root / "corpus" / name)
  data = default.get_config().data
  data.update(tokenizer=SPEC, tfds_name="text_files", text_glob=str(root / "corpus"),
              tfds_data_dir=str(root / "tfds"))
  return data


def _train_texts(data) -> list[str]:
  return list(corpora.iterate_texts("text_files", data.tfds_data_dir, "train", data.text_glob))


@pytest.fixture(scope="module")
def reference(data_config, tmp_path_factory):
  """(tokenizer, fingerprint): train_tokenizer on the whole training split, as the binary does."""
  out_dir = str(tmp_path_factory.mktemp("reference"))
  trained = tokenizers.train_tokenizer("bpe", _train_texts(data_config), VOCAB_SIZE, out_dir)
  return trained, run_tokenizer.fingerprint(out_dir)


@pytest.fixture(scope="module")
def run_dir(data_config, tmp_path_factory) -> str:
  """A workdir whose first start (process 0) made the tokenizer of `SPEC`."""
  workdir = str(tmp_path_factory.mktemp("run"))
  run_tokenizer.prepare(data_config, workdir, write=True)
  return workdir


def test_bpe_spec_is_train_tokenizer_on_the_training_split(run_dir, reference):
  saved = run_tokenizer.saved_tokenizer_dir(run_dir)
  assert saved == os.path.join(run_dir, "tokenizer")
  assert run_tokenizer.fingerprint(saved) == reference[1]  # Byte-identical files.
  assert isinstance(tokenizers.tokenizer_from_directory(saved), tokenizers.HuggingFaceTokenizer)
  assert sorted(os.listdir(run_dir)) == ["tokenizer"]  # No temporary left behind.


def test_round_trip_and_compression_on_stdlib_text(run_dir, data_config):
  tokenizer = tokenizers.tokenizer_from_directory(run_tokenizer.saved_tokenizer_dir(run_dir))
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (
      VOCAB_SIZE, 0, 1, 2)
  held_out = list(corpora.iterate_texts("text_files", data_config.tfds_data_dir, "validation",
                                        data_config.text_glob))
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")) as f:
    unseen = f.read()  # Not among the corpus' modules.
  for text in held_out + [unseen]:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(3 <= i < VOCAB_SIZE for i in ids)
    # A BPE of 512 ids on code: well under half a token per byte (bytes: exactly one).
    assert len(ids) < 0.5 * len(text.encode())


def test_resume_and_readers_reuse_the_saved_tokenizer(run_dir, data_config, monkeypatch):
  saved = run_tokenizer.saved_tokenizer_dir(run_dir)
  before = run_tokenizer.fingerprint(saved)

  def no_training(*args):
    raise AssertionError(f"the saved tokenizer was made again: {args}")

  monkeypatch.setattr(run_tokenizer, "make_tokenizer", no_training)
  other_spec = data_config.copy_and_resolve_references()
  other_spec.tokenizer = "byte"  # The workdir's tokenizer wins over the spec on a restart.
  for write in (True, False):
    resumed = run_tokenizer.prepare(other_spec, run_dir, write=write)
    assert isinstance(resumed, tokenizers.HuggingFaceTokenizer)
    assert resumed.vocab_size == VOCAB_SIZE
  assert run_tokenizer.fingerprint(saved) == before


def test_other_processes_make_the_same_tokenizer(run_dir, data_config, tmp_path):
  """A process that does not write makes the same tokenizer in a scratch directory."""
  workdir = str(tmp_path / "not_process_0")
  made = run_tokenizer.prepare(data_config, workdir, write=False)
  assert not os.path.exists(workdir)  # It wrote nothing.
  chief = tokenizers.tokenizer_from_directory(run_tokenizer.saved_tokenizer_dir(run_dir))
  text = _train_texts(data_config)[0]
  assert made.encode(text) == chief.encode(text)


def test_killed_write_leaves_no_tokenizer_and_the_restart_makes_the_same(
    data_config, reference, tmp_path):
  workdir = tmp_path / "run"
  child = subprocess.run(
      [sys.executable, "-c", _KILLED_BEFORE_RENAME, str(workdir), *_config_args(data_config)],
      env=cpu_env.subprocess_env(1, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="1"),
      capture_output=True, text=True, timeout=300)
  assert child.returncode == -9, child.stderr[-2000:]
  # The child made the whole tokenizer (config included) but never renamed it: nothing reads it.
  [leftover] = os.listdir(workdir)
  assert leftover.startswith(".tokenizer.") and leftover.endswith(".tmp")
  assert tokenizers.CONFIG_FILENAME in os.listdir(workdir / leftover)
  assert run_tokenizer.saved_tokenizer_dir(str(workdir)) is None
  # Another hash seed and thread count gave the same bytes as this process.
  assert run_tokenizer.fingerprint(str(workdir / leftover)) == reference[1]
  restarted = run_tokenizer.prepare(data_config, str(workdir), write=True)
  assert run_tokenizer.fingerprint(run_tokenizer.saved_tokenizer_dir(str(workdir))) == reference[1]
  assert restarted.encode("def f(x):\n    return x\n") == reference[0].encode(
      "def f(x):\n    return x\n")


def _config_args(data) -> list[str]:
  return [f"{key}={data[key]}" for key in ("tokenizer", "tfds_name", "text_glob", "tfds_data_dir",
                                           "text_key", "train_split")]


def test_two_processes_agree_and_a_differing_one_stops_both(data_config, reference, tmp_path):
  port = str(portpicker.pick_unused_port())
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, port, str(i), str(tmp_path),
                             *_config_args(data_config)],
                            env=cpu_env.subprocess_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  lines = [[l for l in out.splitlines() if l.startswith(("same", "error:"))]  # Not gloo's.
           for out, _ in outputs]
  assert [l[0] for l in lines] == [f"same {VOCAB_SIZE} True", f"same {VOCAB_SIZE} False"]
  assert run_tokenizer.fingerprint(str(tmp_path / "run0" / "tokenizer")) == reference[1]
  assert not (tmp_path / "run1").exists()  # Process 1 made its copy in a scratch directory.
  want = (f"error: the tokenizer of process 1 differs from process 0's (SHA-256 "
          f"{reference[1].hex()[:16]}...): give every process the same config.data.tokenizer "
          f"and training data")
  assert [l[1:] for l in lines] == [[want], [want]]
  assert os.listdir(tmp_path / "other0") == []  # Process 0 saved nothing.


def test_a_refused_tokenizer_is_not_saved(data_config, tmp_path):
  """A check that refuses the new tokenizer (a fine-tuning source's differs) keeps nothing."""

  def refuse(tokenizer):
    raise ValueError(f"refused {tokenizer.vocab_size}")

  with pytest.raises(ValueError, match=f"refused {VOCAB_SIZE}"):
    run_tokenizer.prepare(data_config, str(tmp_path), write=True, check=refuse)
  assert os.listdir(tmp_path) == []


def test_sample_is_the_first_documents_up_to_the_byte_bound():
  texts = ["abc", "", "dé", "xyz", "never"]
  assert run_tokenizer._first_bytes(texts, 100) == ["abc", "dé", "xyz", "never"]
  assert run_tokenizer._first_bytes(texts, 6) == ["abc", "dé"]  # 3 + 3 bytes.
  assert run_tokenizer._first_bytes(texts, 5) == ["abc", "d"]  # "é" (2 bytes) cut: dropped.
  assert run_tokenizer._first_bytes(texts, 7) == ["abc", "dé", "x"]


def test_training_sample_of_sources_shares_the_bound_by_weight(tmp_path):
  for name, letter in (("a", "A"), ("b", "B")):
    (tmp_path / f"{name}.jsonl").write_text(
        "".join(f'{{"text": "{letter * 10}"}}\n' for _ in range(50)))
  data = default.get_config().data
  data.update(sources=f"name=a,kind=jsonl,path={tmp_path}/a.jsonl,weight=3;"
                      f"name=b,kind=jsonl,path={tmp_path}/b.jsonl,weight=1",
              index_dir=str(tmp_path / "index"))
  sample = run_tokenizer.training_sample(data, max_bytes=200)
  assert sample == ["A" * 10] * 15 + ["B" * 10] * 5  # 150 and 50 bytes.


@pytest.mark.parametrize("spec", ["bpe:0", "bpe:abc", "bpe:258", "bpe:", "bpe:-5", "bpe:1e3"])
def test_bad_bpe_spec_is_one_line_naming_it(spec):
  config = default.get_config()
  config.data.tokenizer = spec
  _, errors = validation.config_errors(config, check_data=True)
  assert errors == [f"config.data.tokenizer={spec!r} is invalid: 'bpe:N' needs an integer "
                    f"N >= 259 (the 256 byte tokens plus pad, bos and eos)"]
  with pytest.raises(ValueError, match="'bpe:N' needs an integer N >= 259"):
    tokenizers.trained_bpe_vocab_size(spec)


def test_model_vocabulary_smaller_than_the_bpe_is_one_line_naming_both():
  config = default.get_config()
  config.data.tokenizer = "bpe:2048"
  _, errors = validation.config_errors(config, check_data=True)
  assert errors == ["config.model.vocab_size=1024 is invalid: must be >= the vocabulary of "
                    "config.data.tokenizer='bpe:2048' (2048 ids)"]


def test_the_default_config_trains_a_bpe_that_fits_its_model():
  config = default.get_config()
  assert tokenizers.trained_bpe_vocab_size(config.data.tokenizer) == config.model.vocab_size
  assert validation.config_errors(config, check_data=True)[1] == []
  with pytest.raises(ValueError, match="names a BPE that a training run trains"):
    tokenizers.load_tokenizer(config.data.tokenizer)
