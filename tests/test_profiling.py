"""The op-time breakdown: HLO instructions classified by kind and region, times from a trace."""

import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax import profiling


def test_classify_and_breakdown_of_a_program_with_named_regions():
  """A matmul under 'attn', a softmax under 'norm' and a loop: every class is what its scope says,
  and the traced op time is positive for both kinds and no larger than the calls' wall time."""

  def f(a_NxN, b_NxN):
    with jax.named_scope("jvp(Model.features)/attn"):
      c = a_NxN @ b_NxN
    with jax.named_scope("jvp(Model.features)/attn_norm"):
      d = jax.nn.softmax(c * 3.0, axis=-1)
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x) + i, d)

  a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
  jitted = jax.jit(f)
  compiled = jitted.lower(a, a).compile()
  classes = profiling.classify_instructions(compiled.as_text())
  assert ("matmul", "attention") in classes.values()
  assert ("other", "norms") in classes.values()
  assert any(v is None for v in classes.values())  # The while loop: its body is counted.
  assert ("matmul", "norms") not in classes.values()
  jax.block_until_ready(jitted(a, a))
  breakdown = profiling.op_breakdown(lambda: jax.block_until_ready(jitted(a, a)),
                                     compiled.as_text(), repeats=2)
  seconds = breakdown["seconds"]
  assert seconds["matmul"]["attention"] > 0 and seconds["other"]["norms"] > 0
  assert set(seconds["matmul"]) == {"attention"}
  assert breakdown["total_op_s"] == sum(s for k in seconds.values() for s in k.values())
  lines = profiling.format_breakdown(breakdown, "f")
  assert lines[0].startswith("f: op time") and lines[-1].split()[0] == "total"
