"""The paper's 1.3B dense comparison: 20 layers, d_model 2048, window 512, T = 3.

YOCO-U (arXiv 2604.01220) compares 1.3B dense models of 20 layers (10 self- + 10 cross-decoder
layers for YOCO/YOCO-U; 10 looped x 3 + 10 plain layers for RINS), SWA W = 512, T = 3, sequence
length 8192, 4M-token batches, AdamW (0.9, 0.95), lr 1e-3. The paper does not state heads, FFN
width or vocabulary; the choices here are Llama-style: 16 query heads of 128 (GQA with 4 K/V
heads), SwiGLU width 5632 (8/3 d rounded up to a multiple of 256) and a 100K vocabulary like
YOCO's tiktoken cl100k, which gives 1.31B parameters for the transformer and 1.29B for
yoco/yocou (``python -m experiments.plan --config=experiments/configs/yocou_1p3b.py``).

Memory on a v5p-8 (``python -m experiments.compile_for --config=experiments/configs/yocou_1p3b.py
--topology=v5p:2x2x2``; 512 rows of 8192 tokens a step, full FSDP over 8 chips, per chip):

  microbatches  remat    loss                 temporaries  per row  total   of 95 GiB HBM
  16            full     materialised logits  31.2 GiB     7.8 GiB  -       fits
  4             full     materialised logits  93 GiB       5.8 GiB  -       does not fit
  4             full     fused (256 / chunk)  57.8 GiB     3.6 GiB  59.7    fits (63%)
  4             offload  fused (256 / chunk)  43.2 GiB     2.7 GiB  45.2    fits (48%)
  4             full     fused, bfloat16 projections, SwiGLU in 2048-position chunks:
                                              48.4 GiB     3.0 GiB  50.3    fits (53%)
  4             offload  fused, projection kernels and the loss projection gathered before
                         their matmuls, RoPE custom VJP, SwiGLU chunks (compile 466 s):
                                              21.88 GiB    1.37 GiB 23.91   fits (25%)

Per row of 8192 tokens, what a chip holds besides each layer application's saved input (one
[16, 8192, 2048] bfloat16 per application, 0.5 GiB for 16 rows) is the working set of one layer's
backward pass. Two changes shrink it: the projections return the compute dtype (bfloat16: no
float32 [rows, 8192, 5632] SwiGLU buffers or float32 cotangents), and the SwiGLU runs over chunks
of 2048 positions (``ffn_chunk_size``). On a 4-layer proxy of this config (``--config.model.
num_layers=4``, same widths and rows; XLA's buffer-assignment heap per chip) the heap goes
19.15 GiB -> 17.49 (bfloat16 projections) -> 12.25 (and SwiGLU chunks); with 8 layers it is
16.05 (23.15 before), so each further layer application adds 0.475 GiB (its saved input). That
heap does not extrapolate linearly to the 20-layer temporaries (which XLA reports apart from
this heap): the 20-layer compile measured 57.8 -> 48.4 GiB (3.0 GiB a row; the goal of 1.95 a
row is not reached with full remat).

Where the rest goes (proxies with ``--config.model.num_layers=4`` and ``=8``: 8 and 16 layer
applications, same widths, rows, sharding and remat; compile_for's temporaries per chip): 16.79
and 25.06 GiB, so temporaries = 8.5 GiB + 1.03 GiB per layer application (40 at 20 layers:
49.9 GiB extrapolated, 48.4 measured). Each application costs twice its saved input: 0.5 GiB in
XLA's buffer-assignment heap (the layer scan's stacked inputs) and 0.5 GiB that the TPU
compiler reports outside that heap (temporaries minus heap: 5.6 GiB at 8 applications, 9.7 at
16). The heap's peak at 4 layers (12.35 GiB; ``XLA_FLAGS=--xla_dump_to=DIR``, the
``*live-range.txt`` file) was in the loss's forward pass: the output projection, sharded along
D, was gathered inside the chunk loop as a windowed matmul whose float32 partial sums kept three
[16, 256, 100352] float32 chunks (4.6 GiB) alive; the q and SwiGLU projections had float32
windowed-matmul accumulators too ([16, 8192, 16, 128], [16, 2048, 5632]: the float32
accumulation rounded by ``.astype`` is not fused there), and RoPE's autodiff backward kept two
float32 copies of its cotangent. Gathering the loss projection once per pass, each Projection's
kernel before its matmul, and RoPE's custom VJP took that peak to 8.60 GiB, the temporaries to
16.08 GiB (-0.7). So with full remat the layer applications alone (1.03 GiB x 40 = 41 GiB, 2.6
GiB a row) exceed the goal of 1.95 GiB a row (31.2 GiB for 16 rows): it needs the saved inputs
out of HBM (``remat=offload``). With ``--config.model.remat=offload`` the same proxies give 22.79
GiB (4 layers: the backward's peak holds all 8 inputs prefetched back from the host, 0.5 GiB
each) and 16.60 GiB (8 layers, 1.04 GiB a row): the temporaries no longer grow with depth, and
how many inputs the compiler prefetches at once decides them. The 20-layer compile with
``--config.model.remat=offload`` (table) holds 1.37 GiB a row: 5.7x less than with the
materialised logits, within the goal of 1.95.

The other archs at 4 microbatches, full remat, fused loss (``--config.model.arch=...``):
transformer 37.2 GiB of temporaries (2.3 GiB a row, 39.1 GiB in all), yoco 37.8 (2.4, 39.7),
rins 57.3 (3.6, 59.3): all fit (figures from before this config's last changes). The default
is 2 microbatches with ``remat=offload`` (the TPU rungs from s4 up; 2 microbatches: yocou 39.49
GiB of temporaries, 1.23 GiB a row, 41.53 GiB in all, 44%; rins 38.01, 40.09 in all; 1
microbatch: yocou 79.58, 81.51 in all, 86%): each layer's input is kept in
host memory (26.5 GiB less HBM for yocou than full remat) at the cost of moving it to the host
and back every microbatch; ``--config.model.remat=full`` keeps it in HBM (48.4 GiB, fits).
``compile_for`` at this config's latest code: 35.74 GiB of temporaries, 37.80 in all (40%), and
70.0 GiB of pinned host memory per chip (its ``host_temporaries``): 280 GiB of each 4-chip v5p
host's 448 GB.

This is rung ``s4`` of ``ladder.py`` on TPU (full FSDP). Switch arch with ``--config.model.arch``;
``num_iterations`` is the T of every looped arch (the paper's looped Transformer loops twice:
``--config.model.num_iterations=2``). For GPU hosts use ``ladder.py:yocou,s4,gpu``.
"""

import ml_collections

from experiments.configs import ladder


def get_config() -> ml_collections.ConfigDict:
  return ladder.get_config("yocou,s4,tpu")
