"""RULER's single-needle retrieval tasks (S-NIAH-1/2/3), generated locally and scored by its rule.

The strings are RULER's (``scripts/data/synthetic/constants.py``, single-needle form):

* ``s_niah_1``: a "noise" haystack (one repeated filler paragraph per line), key words, 7-digit
  numbers;
* ``s_niah_2``: an essay haystack, key words, 7-digit numbers;
* ``s_niah_3``: an essay haystack, key words, UUIDs.

Offline substitutes: keys are ``adjective-noun`` from the word lists bundled with ``wonderwords``
(RULER's own source); the essay is a local prose text (by default the Python Language Reference,
:func:`corpus.book_text`) split into sentences by a regex instead of nltk. Every sample is drawn
from a ``random.Random`` seeded by SHA-256 of (seed, task, length, depth, index), so a grid is
reproducible anywhere. A sample's prompt (with the answer prefix) plus ``tokens_to_generate``
fits in its ``max_length`` tokens, as in RULER; the needle sits at ``depth`` percent of the
haystack (sentence ``int(n * depth / 100)`` of an essay, line ``round(n * depth / 100)`` of noise).

Scoring is RULER's ``string_match_all``: control characters become newlines, and a prediction
scores the fraction of reference values it contains (case-insensitive); one needle makes it 0/1.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import importlib.resources
import random
import re
import uuid
from typing import Callable, Optional, Sequence

import numpy as np

TASKS = {  # name: (haystack, value kind, value noun)
    "s_niah_1": ("noise", "numbers", "number"),
    "s_niah_2": ("essay", "numbers", "number"),
    "s_niah_3": ("essay", "uuids", "uuid"),
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEMPLATE = ("A special magic {noun} is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {noun} afterwards.\n{context}\nWhat is the special magic "
            "{noun} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {noun} for {query} mentioned in the provided text is"
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
TOKENS_TO_GENERATE = 128  # RULER's budget for the answer.


class NiahError(ValueError):
  """Settings that cannot give a grid; the message names the flag."""


@dataclasses.dataclass
class Sample:
  """One prompt, with RULER's fields plus the grid coordinates."""

  index: int
  task: str
  input: str  # Task prompt, without the answer prefix.
  answer_prefix: str
  outputs: list[str]  # Reference values.
  length: int  # Prompt tokens (answer prefix included, BOS included when the tokenizer has one).
  max_length: int
  depth: int  # Percent of the haystack before the needle.
  key: str
  token_position_answer: int  # Token index of the needle's value in the prompt.


@dataclasses.dataclass(frozen=True)
class Haystack:
  """The haystack material: filler lines or essay words."""

  essay_words: tuple[str, ...]

  @classmethod
  def from_text(cls, text: str) -> "Haystack":
    words = tuple(text.split())
    if not words:
      raise NiahError("--haystack holds no text")
    return cls(words)

  def build(self, kind: str, size: int, needle: str, depth: int) -> str:
    """``size`` noise lines or essay words, the needle at ``depth`` percent."""
    if kind == "noise":
      lines = [NOISE] * size
      lines.insert(round(size * depth / 100), needle)
      return "\n".join(lines)
    repeats = -(-size // len(self.essay_words))
    words = (self.essay_words * repeats)[:size]
    sentences = split_sentences(" ".join(words))
    sentences.insert(int(len(sentences) * depth / 100), needle)
    return " ".join(sentences)


def split_sentences(text: str) -> list[str]:
  """Sentences ending in . ! or ? followed by space (a regex stand-in for nltk's punkt)."""
  return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def word_lists() -> tuple[list[str], list[str]]:
  assets = importlib.resources.files("wonderwords") / "assets"
  read = lambda name: sorted((assets / name).read_text(encoding="utf-8").split("\n"))
  return [w for w in read("adjectivelist.txt") if w], [w for w in read("nounlist.txt") if w]


def sample_rng(seed: int, task: str, max_length: int, depth: int, index: int) -> random.Random:
  digest = hashlib.sha256(f"{seed}/{task}/{max_length}/{depth}/{index}".encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_needle(rng: random.Random, kind: str, adjectives, nouns) -> tuple[str, str]:
  key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
  if kind == "numbers":
    return key, str(rng.randint(10**6, 10**7 - 1))
  return key, str(uuid.UUID(int=rng.getrandbits(128), version=4))


def generate_samples(task: str, lengths: Sequence[int], depths: Sequence[int],
                     num_samples: int, encode: Callable[[str], list[int]], haystack: Haystack,
                     *, seed: int = 0,
                     tokens_to_generate: int = TOKENS_TO_GENERATE) -> list[Sample]:
  """``num_samples`` prompts per (length, depth) of ``task``; ``encode`` counts tokens."""
  if task not in TASKS:
    raise NiahError(f"--tasks: unknown task {task!r}; allowed: {', '.join(TASKS)}")
  if any(not 0 <= d <= 100 for d in depths):
    raise NiahError(f"--depths={','.join(map(str, depths))}: each must be in [0, 100]")
  kind, values, noun = TASKS[task]
  adjectives, nouns = word_lists()
  samples = []
  for max_length in lengths:
    budget = max_length - tokens_to_generate
    size = None
    for d_index, depth in enumerate(depths):
      for s_index in range(num_samples):
        rng = sample_rng(seed, task, max_length, depth, s_index)
        key, value = _draw_needle(rng, values, adjectives, nouns)
        needle = NEEDLE.format(kind=values, key=key, value=value)

        def prompt(n: int) -> tuple[str, str, int]:
          text = TEMPLATE.format(noun=noun, query=key,
                                 context=haystack.build(kind, n, needle, depth))
          prefix = ANSWER_PREFIX.format(noun=noun, query=key)
          return text, prefix, len(encode(text + prefix))

        if size is None:  # Largest haystack that fits, once per (task, length).
          size = bisect.bisect_right(range(budget + 1), budget,
                                     key=lambda n: prompt(n)[2]) - 1
          if size < 1:
            raise NiahError(f"--lengths: {max_length} tokens leave no room for a haystack "
                            f"({tokens_to_generate} are kept for the answer)")
        n = size
        while prompt(n)[2] > budget and n > 0:  # This needle may be a few tokens longer.
          n -= 1
        text, prefix, length = prompt(n)
        if length > budget:
          raise NiahError(f"--lengths: {max_length} tokens cannot hold a {task} prompt "
                          f"({length} tokens with no haystack, {tokens_to_generate} for the answer)")
        answer_at = text.index(needle) + len(needle) - len(value) - 1
        samples.append(Sample(
            index=len(samples), task=task, input=text, answer_prefix=prefix, outputs=[value],
            length=length, max_length=max_length, depth=depth, key=key,
            token_position_answer=len(encode(text[:answer_at]))))
  return samples


def postprocess(prediction: str) -> str:
  """RULER's: strip, control characters to newlines, strip."""
  return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  """The fraction of references contained in the prediction, case-insensitive."""
  prediction = postprocess(prediction).lower()
  return sum(r.lower() in prediction for r in references) / len(references)


@dataclasses.dataclass
class Result:
  task: str
  lengths: list[int]
  depths: list[int]
  accuracy: np.ndarray  # [lengths, depths], mean string_match_all in [0, 1].
  predictions: list[str]

  @property
  def per_length(self) -> list[float]:
    return [float(x) for x in self.accuracy.mean(axis=1)]

  @property
  def mean(self) -> float:
    return float(self.accuracy.mean())


def evaluate(samples: Sequence[Sample], predict: Callable[[list[Sample]], list[str]],
             lengths: Sequence[int], depths: Sequence[int]) -> Result:
  """Scores ``predict(samples)`` (one string per sample) on the (length, depth) grid."""
  predictions = predict(list(samples))
  total = np.zeros((len(lengths), len(depths)))
  count = np.zeros((len(lengths), len(depths)))
  for sample, prediction in zip(samples, predictions):
    i, j = list(lengths).index(sample.max_length), list(depths).index(sample.depth)
    total[i, j] += string_match_all(prediction, sample.outputs)
    count[i, j] += 1
  task = samples[0].task if samples else ""
  return Result(task, list(lengths), list(depths), total / np.maximum(count, 1), predictions)


def needle_oracle(samples: Sequence[Sample]) -> list[str]:
  """A 'model' that reads the asked key's needle value off the prompt (scores 1.0)."""
  out = []
  for s in samples:
    match = re.search(rf"for {re.escape(s.key)} is: (\S+)\.", s.input)
    out.append(" " + match.group(1) if match else "")
  return out


def model_predictor(model, tokenizer, max_new_tokens: int, label: Optional[str] = None):
  """Greedy continuations of ``input + answer_prefix`` through a :class:`BatchedModel`."""

  def predict(samples: list[Sample]) -> list[str]:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    prompts = [bos + tokenizer.encode(s.input + s.answer_prefix) for s in samples]
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    outputs = model.generate(prompts, max_new_tokens, stop_tokens=stops,
                             label=label or "generating")
    return [tokenizer.decode(o) for o in outputs]

  return predict
