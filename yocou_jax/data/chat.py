"""SFT conversations: records rendered with a template into tokens and a loss-weight mask.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ...,
"response": ...}` (a user turn and an assistant turn). Each message is rendered with
`config.data.chat_template`, a format string holding `{role}` and `{content}` once each
(default `"<|{role}|>\\n{content}<|end|>\\n"`). The text before `{content}` is the message
header; for assistant messages, `{content}` and the text after it are what the model is trained
to produce. The document is `[bos] + header/content tokens ... + [eos]`; its loss weights are 1 on
the tokens of assistant contents (and their template tails) and on the final eos, 0 elsewhere.

`loss_weights[t]` weighs token `t` as a prediction target: the train and eval steps weigh the
prediction of token `t + 1` from position `t` by `loss_weights[t + 1]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from yocou_jax.data import tokenizers

DEFAULT_TEMPLATE = "<|{role}|>\n{content}<|end|>\n"
TRAINED_ROLES = ("assistant",)


def check_template(template: str) -> None:
  """Raises a one-line ValueError unless `template` holds `{role}` and `{content}` once each."""
  for field in ("{role}", "{content}"):
    if template.count(field) != 1:
      raise ValueError(f"config.data.chat_template={template!r} must hold {field} exactly once.")
  if template.index("{role}") > template.index("{content}"):
    raise ValueError(f"config.data.chat_template={template!r} must put {{role}} before "
                     f"{{content}}.")


def messages_of(record: Mapping[str, Any]) -> list[dict[str, str]]:
  """The messages of a `messages` or `prompt`/`response` record."""
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages):
      raise ValueError(f"chat record 'messages' must be a list of {{role, content}} strings: "
                       f"{str(messages)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
  if "prompt" in record and "response" in record:
    return [{"role": "user", "content": str(record["prompt"])},
            {"role": "assistant", "content": str(record["response"])}]
  raise ValueError(f"chat record has neither 'messages' nor 'prompt' and 'response': keys "
                   f"{sorted(record)}")


def render(record: Mapping[str, Any], template: str = DEFAULT_TEMPLATE
           ) -> list[tuple[str, bool]]:
  """The text pieces of a conversation, each with whether it is trained on."""
  head, tail = template.split("{content}")
  pieces = []
  for message in messages_of(record):
    trained = message["role"] in TRAINED_ROLES
    pieces.append((head.replace("{role}", message["role"]), False))
    pieces.append((message["content"] + tail.replace("{role}", message["role"]), trained))
  return pieces


def tokenize_chat(tokenizer: tokenizers.Tokenizer, record: Mapping[str, Any],
                  template: str = DEFAULT_TEMPLATE) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [L], loss_weights float32 [L]) of one conversation (see the module doc)."""
  tokens, weights = [tokenizer.bos_id], [0.0]
  for text, trained in render(record, template):
    ids = tokenizer.encode(text)
    tokens += ids
    weights += [float(trained)] * len(ids)
  tokens.append(tokenizer.eos_id)
  weights.append(1.0)
  return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)
