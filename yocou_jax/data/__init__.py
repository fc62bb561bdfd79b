"""Data: tokenizers, local TFDS corpora (ArrayRecord), the grain packing pipeline, and sources.

`pipeline` packs one TFDS corpus (`config.data.tfds_name`); `sources` reads Parquet, JSONL and
chat files, `mixture` mixes several sources by weight (`config.data.sources`), `chat` renders
SFT conversations with their loss masks.

Import the submodules directly (`from yocou_jax.data import pipeline`): model and kernel code must
not pull in grain or tensorflow-datasets, which the accelerator machines may lack.
"""
