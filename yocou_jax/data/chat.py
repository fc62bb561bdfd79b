"""SFT conversations: records rendered with a template into tokens and a loss-weight mask.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ...,
"response": ...}` (a user turn and an assistant turn). Each message is rendered with
`config.data.chat_template`, a format string holding `{role}` and `{content}` once each
(default `"<|{role}|>\\n{content}<|end|>\\n"`). The text before `{content}` is the message
header; for assistant messages, `{content}` and the text after it are what the model is trained
to produce. The document is `[bos] + header/content tokens ... + [eos]`; its loss weights are 1 on
the tokens of assistant contents (and their template tails) and on the final eos, 0 elsewhere.

`config.data.chat_template="tokenizer"` uses the tokenizer's own Jinja chat template instead (a
Hugging Face tokenizer with a `chat_template.jinja` file or a `chat_template` entry in the
`tokenizer_config.json` beside its `tokenizer.json`). Each message's text is what the template
adds for it (rendering the conversation up to the message, and up to the one before); for an
assistant message, the text the template adds with `add_generation_prompt=True` is its header
(not trained), the rest is trained. A template whose rendering of a conversation is not a prefix
of its rendering of a longer one cannot be masked this way and raises a ValueError. The
document gets a leading bos and a trained final eos unless the template already put them there.

`loss_weights[t]` weighs token `t` as a prediction target: the train and eval steps weigh the
prediction of token `t + 1` from position `t` by `loss_weights[t + 1]`.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any

import numpy as np

from yocou_jax.data import tokenizers

DEFAULT_TEMPLATE = "<|{role}|>\n{content}<|end|>\n"
TOKENIZER_TEMPLATE = "tokenizer"  # config.data.chat_template: the tokenizer's Jinja template.
TRAINED_ROLES = ("assistant",)


def check_template(template: str) -> None:
  """Raises a one-line ValueError unless `template` holds `{role}` and `{content}` once each.

  The template "tokenizer" (the tokenizer's own) is checked by `check_tokenizer_template`.
  """
  if template == TOKENIZER_TEMPLATE:
    return
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


def check_tokenizer_template(template: str, tokenizer: tokenizers.Tokenizer) -> None:
  """Raises a one-line ValueError when `template` is "tokenizer" and the tokenizer has none."""
  if template == TOKENIZER_TEMPLATE and not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"config.data.chat_template='tokenizer' but {tokenizer!r} has no chat "
                     f"template (a chat_template.jinja file, or a chat_template entry in the "
                     f"tokenizer_config.json beside its tokenizer.json); give a format string "
                     f"with {{role}} and {{content}} instead.")


@functools.lru_cache(maxsize=4)
def _compiled(jinja_template: str):
  import jinja2.sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise ValueError(f"the chat template refused a conversation: {message}")

  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                             lstrip_blocks=True)
  environment.globals["raise_exception"] = raise_exception
  return environment.from_string(jinja_template)


def render_with_tokenizer_template(record: Mapping[str, Any], tokenizer: tokenizers.Tokenizer
                                   ) -> list[tuple[str, bool]]:
  """The text pieces of a conversation under the tokenizer's Jinja template (module doc)."""
  template = _compiled(tokenizer.chat_template)
  special = {"bos_token": getattr(tokenizer, "bos_token", ""),
             "eos_token": getattr(tokenizer, "eos_token", "")}
  messages = messages_of(record)

  def text(count: int, add_generation_prompt: bool = False) -> str:
    return template.render(messages=messages[:count],
                           add_generation_prompt=add_generation_prompt, **special)

  pieces, before = [], text(0)
  if before:
    pieces.append((before, False))
  for i, message in enumerate(messages):
    after = text(i + 1)
    head = text(i, add_generation_prompt=True) if message["role"] in TRAINED_ROLES else after
    if not (head.startswith(before) and after.startswith(head)):
      raise ValueError("the tokenizer's chat template does not render a conversation as a "
                       "prefix of its continuation, so its prompt tokens cannot be masked; set "
                       "config.data.chat_template to a format string with {role} and {content}.")
    pieces.append((head[len(before):], False))
    if len(after) > len(head):
      pieces.append((after[len(head):], True))
    before = after
  return [(piece, trained) for piece, trained in pieces if piece]


def tokenize_chat(tokenizer: tokenizers.Tokenizer, record: Mapping[str, Any],
                  template: str = DEFAULT_TEMPLATE) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [L], loss_weights float32 [L]) of one conversation (see the module doc)."""
  if template == TOKENIZER_TEMPLATE:
    pieces = render_with_tokenizer_template(record, tokenizer)
  else:
    pieces = render(record, template)
  tokens, weights = [], []
  for text, trained in pieces:
    ids = tokenizer.encode(text)
    tokens += ids
    weights += [float(trained)] * len(ids)
  if not tokens or tokens[0] != tokenizer.bos_id:
    tokens, weights = [tokenizer.bos_id] + tokens, [0.0] + weights
  if tokens[-1] != tokenizer.eos_id:
    tokens.append(tokenizer.eos_id)
    weights.append(1.0)
  weights[-1] = 1.0  # The end of the conversation is trained.
  return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)
