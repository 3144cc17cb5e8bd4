"""Pallas kernels for the chunked gated delta rule (GPU and TPU), with custom VJPs.

`gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size) -> (o, final_state)` dispatches
on `jax.default_backend()`: TPU → `kernels_pallas.tpu` (Mosaic), anything else → `kernels_pallas.gpu`
(Triton on GPU, interpret mode on CPU). Per-chunk math shared by both lives in `chunk_math`.
"""
import importlib
import os

import jax

_HAS_TPU = os.path.exists(os.path.join(os.path.dirname(__file__), "tpu.py"))


def supports_backend(backend: str) -> bool:
  """Whether a compiled (non-interpret) Pallas kernel exists for `backend`."""
  if backend in ("gpu", "cuda"):
    return True
  return backend == "tpu" and _HAS_TPU


def unsupported_shape(backend: str, K: int, V: int) -> str | None:
  """Why the compiled kernel for `backend` cannot take head dims K, V; None when it can."""
  if backend in ("gpu", "cuda"):
    for name, dim in (("K", K), ("V", V)):
      if dim < 16 or dim & (dim - 1):
        return (f"head dim {name}={dim}: the Triton kernels need powers of two >= 16 "
                "(dot operands of at least 16, power-of-two blocks)")
  return None


def gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size):
  """See `gdn_jax.ops.gated_delta_rule`; q,k [B,T,Hk,K], v [B,T,H,V], g,beta [B,T,H] f32,
  h0 [B,H,K,V] f32, reset [B,T] bool or None (no packed documents).
  Returns (o [B,T,H,V], final state [B,H,K,V] f32)."""
  if jax.default_backend() == "tpu":
    if reset is None:
      reset = jax.numpy.zeros(v.shape[:2], bool)
    tpu = importlib.import_module("kernels_pallas.tpu")
    return tpu.gated_delta_rule_tpu(q, k, v, g, beta, scale, h0, reset, chunk_size)
  from kernels_pallas import gpu
  return gpu.gated_delta_rule_gpu(q, k, v, g, beta, scale, h0, reset, chunk_size)
