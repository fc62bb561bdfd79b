"""Data: tokenizers, local TFDS corpora (ArrayRecord) and the grain packing pipeline.

Import the submodules directly (`from yocou_jax.data import pipeline`): model and kernel code must
not pull in grain or tensorflow-datasets, which the accelerator machines may lack.
"""
