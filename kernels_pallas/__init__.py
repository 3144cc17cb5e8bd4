"""Pallas kernels for the chunked gated delta rule (GPU and TPU), with custom VJPs.

A leaf package: it imports jax and its own modules, never `gdn_jax`. The op module
(`gdn_jax.ops`) imports this package and the shared chunk math (`chunk_math.py`, `chunk_grads.py`:
the XLA path's identities too) eagerly, the kernels (`gpu/`, `tpu.py`) on first use. Map: README.md.

`gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size, config) -> (o, final_state)`
picks the backend from `config` (`GpuConfig` → `gpu/`, `TpuConfig` → `tpu.py`) or, with config None,
from `jax.default_backend()`: TPU → `tpu.py` (Mosaic), anything else → `gpu/` (Triton on GPU,
interpret mode on CPU).
"""
import jax

from kernels_pallas.config import GpuConfig, TpuConfig

__all__ = ["GpuConfig", "TpuConfig", "gated_delta_rule_pallas", "supports_backend",
           "unsupported_shape"]


def supports_backend(backend: str) -> bool:
  """Whether a compiled (non-interpret) Pallas kernel exists for `backend`."""
  return backend in ("gpu", "cuda", "tpu")


def unsupported_shape(backend: str, K: int, V: int) -> str | None:
  """Why the compiled kernel for `backend` cannot take head dims K, V; None when it can."""
  if backend in ("gpu", "cuda"):
    for name, dim in (("K", K), ("V", V)):
      if dim < 16 or dim & (dim - 1):
        return (f"head dim {name}={dim}: the Triton kernels need powers of two >= 16 "
                "(dot operands of at least 16, power-of-two blocks)")
  return None


def gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size, config=None):
  """See `gdn_jax.ops.gated_delta_rule`; q,k [B,T,Hk,K], v [B,T,H,V], g,beta [B,T,H] f32,
  h0 [B,H,K,V] f32, reset [B,T] bool or None (no packed documents); config: a `GpuConfig`, a
  `TpuConfig` or None (the backend's defaults).
  Returns (o [B,T,H,V], final state [B,H,K,V] f32)."""
  if config is not None and not isinstance(config, (GpuConfig, TpuConfig)):
    raise ValueError(f"gated_delta_rule: `kernel_config`={config!r}; expected a "
                     "kernels_pallas.GpuConfig, a kernels_pallas.TpuConfig or None.")
  if isinstance(config, TpuConfig) or (config is None and jax.default_backend() == "tpu"):
    from kernels_pallas import tpu  # pylint: disable=import-outside-toplevel
    if reset is None:
      reset = jax.numpy.zeros(v.shape[:2], bool)
    return tpu.gated_delta_rule_tpu(q, k, v, g, beta, scale, h0, reset, chunk_size, config)
  from kernels_pallas import gpu  # pylint: disable=import-outside-toplevel
  return gpu.gated_delta_rule_gpu(q, k, v, g, beta, scale, h0, reset, chunk_size, config)
