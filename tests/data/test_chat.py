"""Tests of yocou_jax.data.chat: format-string and tokenizer (Jinja) chat templates, loss masks."""

import json
import os

import numpy as np
import pytest

from yocou_jax.data import chat
from yocou_jax.data import tokenizers

SFT_SAMPLE = os.path.join(os.path.dirname(__file__), "testdata", "sft_sample.jsonl")
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")


def _records() -> list[dict]:
  with open(SFT_SAMPLE) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def bpe_with_template(tmp_path_factory):
  """A byte-level BPE trained on the SFT sample, with a ChatML template beside its file."""
  directory = tmp_path_factory.mktemp("bpe")
  texts = [m["content"] for r in _records() for m in chat.messages_of(r)]
  tokenizers.train_tokenizer("bpe", texts, 320, str(directory))
  (directory / tokenizers.CHAT_TEMPLATE_FILENAME).write_text(CHATML)
  return tokenizers.load_tokenizer(str(directory / tokenizers.HUGGINGFACE_FILENAME)), directory


def _split(tokenizer, tokens, weights) -> tuple[str, str]:
  return (tokenizer.decode(tokens[weights == 1]), tokenizer.decode(tokens[weights == 0]))


def test_format_template_masks_everything_but_assistant_turns():
  tokenizer = tokenizers.ByteTokenizer()
  record = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "3+3?"},
                         {"role": "assistant", "content": "6"}]}
  tokens, weights = chat.tokenize_chat(tokenizer, record, "[{role}] {content};")
  assert tokens[0] == tokenizer.bos_id and weights[0] == 0
  assert tokens[-1] == tokenizer.eos_id and weights[-1] == 1
  assert _split(tokenizer, tokens, weights) == (
      "4;6;", "[system] Be brief.;[user] 2+2?;[assistant] [user] 3+3?;[assistant] ")
  expected = np.concatenate([[0], np.zeros(len("[system] Be brief.;[user] 2+2?;[assistant] ")),
                             np.ones(2), np.zeros(len("[user] 3+3?;[assistant] ")), np.ones(2),
                             [1]])
  np.testing.assert_array_equal(weights, expected)
  prompt_only = chat.tokenize_chat(tokenizer, {"prompt": "hi", "response": ""}, "{role}:{content}")
  assert _split(tokenizer, *prompt_only) == ("", "user:hiassistant:")


def test_tokenizer_template_masks_the_prompt_and_survives_save(bpe_with_template, tmp_path):
  tokenizer, _ = bpe_with_template
  assert tokenizer.chat_template == CHATML
  chat.check_tokenizer_template(chat.TOKENIZER_TEMPLATE, tokenizer)
  for record in _records():
    messages = chat.messages_of(record)
    tokens, weights = chat.tokenize_chat(tokenizer, record, chat.TOKENIZER_TEMPLATE)
    assert tokens[0] == tokenizer.bos_id and weights[0] == 0  # The template's own bos, once.
    assert (tokens == tokenizer.bos_id).sum() == 1
    assert tokens[-1] == tokenizer.eos_id and weights[-1] == 1
    trained = tokenizer.decode(tokens[weights == 1])
    assert trained == "".join(f"{m['content']}<|im_end|>\n" for m in messages
                              if m["role"] == "assistant")
    prompt = tokenizer.decode(tokens[weights == 0])
    assert prompt == "".join(f"<|im_start|>{m['role']}\n" + (
        "" if m["role"] == "assistant" else f"{m['content']}<|im_end|>\n") for m in messages)
  tokenizer.save(str(tmp_path / "saved"))
  assert tokenizers.load_tokenizer(str(tmp_path / "saved")).chat_template == CHATML


def test_tokenizer_template_errors(bpe_with_template, tmp_path):
  _, directory = bpe_with_template
  with pytest.raises(ValueError, match=r"chat_template='tokenizer' but ByteTokenizer\(\) has no "
                                       r"chat template"):
    chat.check_tokenizer_template(chat.TOKENIZER_TEMPLATE, tokenizers.ByteTokenizer())
  # A template that renders the last assistant turn differently is not prefix-stable.
  (tmp_path / tokenizers.HUGGINGFACE_FILENAME).write_bytes(
      (directory / tokenizers.HUGGINGFACE_FILENAME).read_bytes())
  (tmp_path / tokenizers.CHAT_TEMPLATE_FILENAME).write_text(
      "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n"
      "{% endfor %}")
  unstable = tokenizers.load_tokenizer(str(tmp_path / tokenizers.HUGGINGFACE_FILENAME))
  with pytest.raises(ValueError, match="does not render a conversation as a prefix"):
    chat.tokenize_chat(unstable, {"prompt": "a", "response": "b"}, chat.TOKENIZER_TEMPLATE)
  with pytest.raises(ValueError, match="neither 'messages' nor 'prompt' and 'response'"):
    chat.tokenize_chat(unstable, {"text": "a"}, chat.TOKENIZER_TEMPLATE)
