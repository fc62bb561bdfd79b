"""Pallas kernels for local-window and cross attention (with pure-JAX references beside them)."""
