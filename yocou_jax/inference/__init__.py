"""Inference: K/V caches, chunked prefill with early exit, cached decode, sampling, generation."""

from yocou_jax.inference.cache import cache_bytes, init_cache
from yocou_jax.inference.engine import DecodeState, Engine, Generation, Options
from yocou_jax.inference.sampling import SamplingConfig
