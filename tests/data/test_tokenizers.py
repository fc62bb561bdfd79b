"""Tests of yocou_jax.data.tokenizers: round trips, robustness, save/load, training."""

import json
import os
import random
import sysconfig

from absl.testing import flagsaver
import numpy as np
import pytest
import tokenizers as hf_tokenizers

from experiments import train_tokenizer
from yocou_jax.data import tokenizers

_UNICODE_SAMPLE = ("héllo wörld 🎉 ∑ 中文 \n\t  x = 1\r\n\x00\x7f" +
                   "".join(chr(c) for c in range(0x20, 0x3000, 97)) + "\U0001F600\U0010FFFF")


def _ids(tokenizer: tokenizers.Tokenizer) -> tuple[int, int, int, int]:
  return tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id


def _random_unicode(rng: random.Random, length: int) -> str:
  """Random text over all Unicode scalar values (every plane, no surrogates)."""
  code_points = []
  while len(code_points) < length:
    code_point = rng.choice([rng.randrange(0x80), rng.randrange(0x800),
                             rng.randrange(0x10000), rng.randrange(0x110000)])
    if not 0xD800 <= code_point <= 0xDFFF:
      code_points.append(code_point)
  return "".join(map(chr, code_points))


@pytest.fixture(scope="module")
def training_texts() -> list[str]:
  """About 300 KB of real Python source from the standard library."""
  root = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[:40]
  texts = []
  for name in names:
    with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
      texts.append(f.read())
  return texts


@pytest.fixture(scope="module", params=tokenizers.TRAINABLE_KINDS)
def trained(request, training_texts, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp(f"tokenizer_{request.param}"))
  return tokenizers.train_tokenizer(request.param, training_texts, 600, out_dir), out_dir


def test_byte_tokenizer_ids():
  tokenizer = tokenizers.load_tokenizer("byte")
  assert isinstance(tokenizer, tokenizers.ByteTokenizer)
  assert _ids(tokenizer) == (259, 0, 1, 2)
  assert tokenizer.encode("A\x00é") == [ord("A") + 3, 3, 0xC3 + 3, 0xA9 + 3]


def test_byte_tokenizer_round_trips_arbitrary_unicode():
  tokenizer = tokenizers.ByteTokenizer()
  rng = random.Random(0)
  for text in [_UNICODE_SAMPLE, ""] + [_random_unicode(rng, 200) for _ in range(50)]:
    ids = tokenizer.encode(text)
    assert all(3 <= i < 259 for i in ids)
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_decode_never_raises():
  tokenizer = tokenizers.ByteTokenizer()
  rng = np.random.default_rng(0)
  for _ in range(100):
    ids = rng.integers(-1000, 1000, size=rng.integers(0, 50))
    assert isinstance(tokenizer.decode(ids), str)
  # Specials and out-of-range ids are dropped; a lone continuation byte becomes U+FFFD.
  assert tokenizer.decode([1, ord("a") + 3, 0, 2, 259, -1, 0x80 + 3]) == "a\ufffd"
  assert tokenizer.decode(np.array([[ord("h") + 3, ord("i") + 3]])) == "hi"
  assert tokenizer.decode(i + 3 for i in b"gen") == "gen"
  assert tokenizer.encode("\ud800") == [ord("?") + 3]  # A lone surrogate is not UTF-8.


def test_byte_tokenizer_save_and_load(tmp_path):
  tokenizers.ByteTokenizer().save(str(tmp_path))
  rebuilt = tokenizers.tokenizer_from_directory(str(tmp_path))
  assert isinstance(rebuilt, tokenizers.ByteTokenizer)
  assert isinstance(tokenizers.load_tokenizer(str(tmp_path)), tokenizers.ByteTokenizer)


def test_trained_tokenizer_round_trips(trained, training_texts):
  tokenizer, _ = trained
  assert _ids(tokenizer) == (600, 0, 1, 2)
  for text in training_texts[:5] + [_UNICODE_SAMPLE, "   indented\n\n\ttabs  \n"]:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
  # Compression on code the tokenizer was trained on: well below one token per byte.
  text = training_texts[0]
  assert len(tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_trained_tokenizer_has_no_unknown_tokens(trained):
  tokenizer, _ = trained
  rng = random.Random(1)
  for _ in range(20):
    text = _random_unicode(rng, 100)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_trained_tokenizer_decode_skips_specials_and_bad_ids(trained):
  tokenizer, _ = trained
  ids = tokenizer.encode("def f(x):")
  noisy = [tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id, -5, 10**9]
  assert tokenizer.decode(noisy) == "def f(x):"


def test_trained_tokenizer_is_rebuilt_identically(trained, training_texts, tmp_path):
  tokenizer, out_dir = trained
  copy_dir = str(tmp_path / "copy")
  tokenizer.save(copy_dir)
  model_file = (tokenizers.HUGGINGFACE_FILENAME
                if isinstance(tokenizer, tokenizers.HuggingFaceTokenizer)
                else tokenizers.SENTENCEPIECE_FILENAME)
  for spec in (out_dir, copy_dir, os.path.join(copy_dir, model_file)):
    rebuilt = tokenizers.load_tokenizer(spec)
    assert type(rebuilt) is type(tokenizer)
    assert _ids(rebuilt) == _ids(tokenizer)
    for text in training_texts[5:10] + [_UNICODE_SAMPLE]:
      assert rebuilt.encode(text) == tokenizer.encode(text)
  with open(os.path.join(copy_dir, tokenizers.CONFIG_FILENAME)) as f:
    assert json.load(f)["kind"] in ("huggingface", "sentencepiece")


def _hf_tokenizer_file(path, special_tokens: list[str]) -> str:
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=special_tokens, show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(["hello world"] * 10, trainer=trainer)
  tokenizer.save(str(path))
  return str(path)


def test_hugging_face_specials_are_found_by_name(tmp_path):
  gpt2_style = tokenizers.load_tokenizer(_hf_tokenizer_file(tmp_path / "a.json", ["<|endoftext|>"]))
  assert gpt2_style.bos_id == gpt2_style.eos_id == gpt2_style.pad_id == 0
  llama_style = tokenizers.load_tokenizer(
      _hf_tokenizer_file(tmp_path / "b.json", ["<unk>", "<s>", "</s>", "[PAD]"]))
  assert (llama_style.bos_id, llama_style.eos_id, llama_style.pad_id) == (1, 2, 3)
  with pytest.raises(ValueError, match="no end-of-text special token"):
    tokenizers.load_tokenizer(_hf_tokenizer_file(tmp_path / "c.json", ["<unk>"]))


def test_bad_specs_raise_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown tokenizer spec 'gpt2': expected 'byte'") as e:
    tokenizers.load_tokenizer("gpt2")
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizers.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="Unknown tokenizer kind 'wordpiece'"):
    tokenizers.train_tokenizer("wordpiece", ["a"], 300, str(tmp_path))
  with pytest.raises(ValueError, match="vocab_size >= 259"):
    tokenizers.train_tokenizer("bpe", ["a"], 100, str(tmp_path))


def test_tampered_config_is_detected(tmp_path):
  tokenizers.ByteTokenizer().save(str(tmp_path))
  config_path = tmp_path / tokenizers.CONFIG_FILENAME
  config = json.loads(config_path.read_text())
  config["eos_id"] = 7
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="does not match its model file"):
    tokenizers.tokenizer_from_directory(str(tmp_path))


def test_train_tokenizer_binary(tmp_path, training_texts):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, text in enumerate(training_texts[:10]):
    (corpus / f"{i}.py").write_text(text)
  out_dir = str(tmp_path / "tokenizer")
  with flagsaver.flagsaver(kind="bpe", vocab_size=400, out_dir=out_dir, text_glob=str(corpus),
                           tfds_data_dir=str(tmp_path / "tfds")):
    train_tokenizer.main([])
  tokenizer = tokenizers.load_tokenizer(out_dir)
  assert isinstance(tokenizer, tokenizers.HuggingFaceTokenizer) and tokenizer.vocab_size == 400
  assert tokenizer.decode(tokenizer.encode(training_texts[0])) == training_texts[0]
