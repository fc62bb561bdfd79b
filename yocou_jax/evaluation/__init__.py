"""Evaluation on the cached inference engine: long-context perplexity, S-NIAH, lm-eval adapter.

* :mod:`batched`: fixed-shape batches of log-likelihood and generation requests (a handful of
  compiled programs whatever the request mix), shared by every evaluation.
* :mod:`corpus`: the documents of ``code``, ``book`` or a path.
* :mod:`perplexity`: the perplexity of the last tokens of a document as its visible prefix grows.
* :mod:`niah`: RULER's single-needle tasks, generated locally, and their scoring.
* :mod:`harness`: the model class registered with lm-evaluation-harness (imports ``lm_eval``).
* :mod:`report`: progress with ETA, text tables, JSON and PNG writing.
"""
