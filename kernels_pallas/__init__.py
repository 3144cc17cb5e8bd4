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


def gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size):
  """See `gdn_jax.ops.gated_delta_rule`; q,k [B,T,Hk,K], v [B,T,H,V], g,beta [B,T,H] f32,
  h0 [B,H,K,V] f32, reset [B,T] bool. Returns (o [B,T,H,V], final state [B,H,K,V] f32)."""
  if jax.default_backend() == "tpu":
    tpu = importlib.import_module("kernels_pallas.tpu")
    return tpu.gated_delta_rule_tpu(q, k, v, g, beta, scale, h0, reset, chunk_size)
  from kernels_pallas import gpu
  return gpu.gated_delta_rule_gpu(q, k, v, g, beta, scale, h0, reset, chunk_size)
