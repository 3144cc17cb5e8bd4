"""`gated_delta_rule`: one public entry point for every implementation of the rule.

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ     (S: K×V, float32)
    o_t = scale · S_tᵀ q_t

Layout is fla's: [batch, time, heads, dim]. Value heads may outnumber q/k heads
(grouped value attention, GVA): value head h reads q/k head h // (H / Hk).

Implementations (all take the same validated, pre-processed inputs), in the registry `_REGISTRY`:
  * "recurrent": `lax.scan` over time, the readable reference (`recurrent.py`).
  * "chunked":   chunkwise-parallel WY / UT-transform algorithm in pure JAX (`chunked.py`).
  * "pallas":    the Pallas kernels in `kernels_pallas` (GPU: Triton; TPU: Mosaic), a leaf package
                 (it imports nothing from `gdn_jax`, so nothing cycles). Its package and shared
                 chunk math load with this module (the "chunked" path uses the same math); the
                 kernels themselves (`gpu/`, `tpu.py`) load on first use. Under an active mesh
                 (`jax.set_mesh`) they run once per device inside `jax.shard_map`, batch and heads
                 split, the sequence local (`sharded.py`).
  * "auto":      the fastest correct one for the default backend (`default_impl`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import kernels_pallas
from gdn_jax.ops import sharded
from gdn_jax.ops.chunked import chunked_gated_delta_rule
from gdn_jax.ops.recurrent import recurrent_gated_delta_rule

L2NORM_EPS = 1e-6


def l2_normalize(x, eps: float = L2NORM_EPS):
  """x / sqrt(Σ x² + eps) over the last axis, in float32 (fla's l2norm)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def _expand_heads(x_BxTxHkxD, num_heads: int):
  """Broadcast q/k heads to the value heads (value head h reads h // group)."""
  group = num_heads // x_BxTxHkxD.shape[2]
  return x_BxTxHkxD if group == 1 else jnp.repeat(x_BxTxHkxD, group, axis=2)


def _recurrent(q, k, v, g, beta, scale, h0, reset, chunk_size, kernel_config):
  del chunk_size, kernel_config
  H = v.shape[2]
  return recurrent_gated_delta_rule(_expand_heads(q, H), _expand_heads(k, H), v, g, beta,
                                    scale, h0, reset)


def _chunked(q, k, v, g, beta, scale, h0, reset, chunk_size, kernel_config):
  del kernel_config
  return chunked_gated_delta_rule(q, k, v, g, beta, scale, h0, reset, chunk_size)


def _pallas(q, k, v, g, beta, scale, h0, reset, chunk_size, kernel_config):
  def kernel(q, k, v, g, beta, h0, reset):
    return kernels_pallas.gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size,
                                                  kernel_config)
  return sharded.per_device(kernel, q, k, v, g, beta, h0, reset)


def _runs_anywhere(backend: str, K: int | None, V: int | None) -> str | None:
  del backend, K, V
  return None


def _pallas_unsupported(backend: str, K: int | None, V: int | None) -> str | None:
  if backend != "cpu" and not kernels_pallas.supports_backend(backend):   # CPU: interpret mode
    return f"no Pallas kernel for backend {backend!r}"
  return None if K is None or V is None else kernels_pallas.unsupported_shape(backend, K, V)


class _Impl(NamedTuple):
  """One implementation of the rule in the registry."""
  run: Callable          # (q, k, v, g, beta, scale, h0, reset, chunk_size, kernel_config) -> (o, S)
  unsupported: Callable  # (backend, K or None, V or None) -> why it cannot compile there, or None


_REGISTRY: dict[str, _Impl] = {
    "recurrent": _Impl(_recurrent, _runs_anywhere),
    "chunked": _Impl(_chunked, _runs_anywhere),
    "pallas": _Impl(_pallas, _pallas_unsupported),
}
IMPLS = ("auto", *_REGISTRY)


def default_impl(backend: str | None = None, K: int | None = None, V: int | None = None,
                 num_devices: int = 1) -> str:
  """The implementation "auto" resolves to on `backend` (default: jax's default backend), for
  head dims K, V when given, when one call's arrays span `num_devices` devices.

  TPU: the Mosaic kernel (`kernels_pallas/tpu.py`). GPU: the Triton kernels (`kernels_pallas/gpu/`),
  unless K or V is not a power of two ≥ 16: 1.7–1.8× faster than "chunked" for forward+backward on
  the H100 already in their first decomposition (experiments/results/bench_kernels_h100_v4c.md);
  2.25 ms at B8 T2048 H16 K=V=128 bf16 now (`_v8c`), against chunked's 8.38 (bench_ops).
  On several devices: "chunked", because XLA cannot partition a Pallas custom call over a
  batch- or head-sharded program (it would gather the inputs onto every device). Under an active
  mesh whose axes split the batch and heads (`sharded.py`) each call spans one device
  (`gated_delta_rule` passes num_devices=1 there), so the kernels stay.
  CPU: "chunked" (the recurrent scan is faster forward-only, chunked is faster for training).
  """
  backend = backend or jax.default_backend()
  if (backend in ("tpu", "gpu", "cuda") and num_devices == 1
      and _REGISTRY["pallas"].unsupported(backend, K, V) is None):
    return "pallas"
  return "chunked"


def _resolve_impl(impl: str, backend: str, B: int, Hk: int, H: int, K: int, V: int) -> str:
  """"auto" → `default_impl` for this call; "pallas" → itself, or why it cannot run here."""
  if impl == "auto":
    active, mesh = jax.sharding.get_abstract_mesh(), sharded.mapped_mesh()
    if mesh is not None:  # one kernel call per device if the shapes split, else XLA's partitioning
      n = 1 if sharded.split_error(mesh, B, Hk, H) is None else mesh.size
    elif active.empty or active.manual_axes:
      # No mesh: the arrays' layout is unknown. Inside a shard_map (Manual axes): its check_vma
      # wants each output's varying axes, which pallas_call does not declare.
      n = jax.device_count()
    else:
      n = 1  # a mesh of one device
    return default_impl(backend, K=K, V=V, num_devices=n)
  if impl == "pallas":
    why = _REGISTRY["pallas"].unsupported(backend, K, V)
    if why is not None:
      raise ValueError(f"gated_delta_rule: impl='pallas' on {backend}: {why}; use impl='chunked'.")
  return impl


def _shape_error(name, got, expected):
  return ValueError(f"gated_delta_rule: `{name}` has shape {tuple(got)}, expected {expected}.")


def _check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"gated_delta_rule: `{name}` has dtype {x.dtype}; expected a floating dtype "
                     f"(float32, bfloat16, float16). Cast it with `{name}.astype(jnp.float32)`.")


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl, scale,
              qk_norm_eps, kernel_config):
  if impl not in IMPLS:
    raise ValueError(f"gated_delta_rule: unknown `impl`={impl!r}; expected one of {IMPLS}.")
  if kernel_config is not None and impl in ("recurrent", "chunked"):
    raise ValueError(f"gated_delta_rule: `kernel_config`={kernel_config!r} with impl={impl!r}; "
                     "kernel settings are for impl='pallas' (or 'auto'): pass None.")
  for name, x, rank, dims in (("q", q, 4, "[B, T, Hk, K]"), ("k", k, 4, "[B, T, Hk, K]"),
                              ("v", v, 4, "[B, T, H, V]"), ("g", g, 3, "[B, T, H]"),
                              ("beta", beta, 3, "[B, T, H]")):
    if x.ndim != rank:
      raise ValueError(f"gated_delta_rule: `{name}` has rank {x.ndim} (shape {tuple(x.shape)}); "
                       f"expected rank {rank}: {dims}.")
    _check_float(name, x)
  B, T, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  if k.shape != q.shape:
    raise _shape_error("k", k.shape, f"q's shape {tuple(q.shape)} = [B, T, Hk, K]")
  if v.shape[:2] != (B, T):
    raise _shape_error("v", v.shape, f"[B={B}, T={T}, H, V] (batch and time of q)")
  if H % Hk != 0:
    raise ValueError(f"gated_delta_rule: `v` has H={H} value heads, not a multiple of the "
                     f"Hk={Hk} q/k heads; expected H % Hk == 0 (grouped value heads).")
  for name, x in (("g", g), ("beta", beta)):
    if x.shape != (B, T, H):
      raise _shape_error(name, x.shape, f"[B, T, H] = {(B, T, H)}")
  if initial_state is not None:
    _check_float("initial_state", initial_state)
    if initial_state.shape != (B, H, K, V):
      raise _shape_error("initial_state", initial_state.shape, f"[B, H, K, V] = {(B, H, K, V)}")
  if segment_ids is not None:
    if segment_ids.shape != (B, T):
      raise _shape_error("segment_ids", segment_ids.shape, f"[B, T] = {(B, T)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"gated_delta_rule: `segment_ids` has dtype {segment_ids.dtype}; "
                       "expected an integer dtype (one id per packed document).")
  if (not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size > 128
      or chunk_size & (chunk_size - 1)):
    raise ValueError(f"gated_delta_rule: `chunk_size`={chunk_size!r}; expected a power of two "
                     "in [16, 128] (e.g. 64).")
  if (not isinstance(qk_norm_eps, (int, float)) or isinstance(qk_norm_eps, bool)
      or not qk_norm_eps > 0):
    raise ValueError(f"gated_delta_rule: `qk_norm_eps`={qk_norm_eps!r}; expected a positive "
                     "Python float (fla's value is 1e-6).")
  if scale is not None and not isinstance(scale, (int, float)):
    raise ValueError(f"gated_delta_rule: `scale`={scale!r}; expected a Python float or None "
                     "(None means K^-1/2).")


def gated_delta_rule(q, k, v, g, beta, *, scale: float | None = None, initial_state=None,
                     output_final_state: bool = False, use_qk_l2norm: bool = False,
                     qk_norm_eps: float = L2NORM_EPS, segment_ids=None, chunk_size: int = 64,
                     impl: str = "auto", kernel_config=None):
  """Gated delta rule over a sequence (fla's `chunk_gated_delta_rule` semantics).

  Args:
    q, k: [B, T, Hk, K] queries and keys.
    v: [B, T, H, V] values, H % Hk == 0.
    g: [B, T, H] log decay (≤ 0); the state is multiplied by e^{g_t}.
    beta: [B, T, H] write strength β_t (σ(·) ∈ (0, 1), or (0, 2) with negative eigenvalues).
    scale: readout scale; None means K^-1/2.
    initial_state: optional [B, H, K, V] state before the first token.
    output_final_state: return the state after the last token.
    use_qk_l2norm: L2-normalise q and k over K first: q / sqrt(Σ q² + qk_norm_eps).
    qk_norm_eps: the eps inside that sqrt (fla's 1e-6). It caps the norm's gain 1/|q| (its
      Jacobian is (I − q̂q̂ᵀ)/|q|) at qk_norm_eps^-1/2 and shortens q, k with |q|² ≲ eps.
    segment_ids: optional [B, T] integer ids of packed documents. The state is reset to zero
      wherever the id changes (initial_state feeds the first document only).
    chunk_size: chunk length C of the chunked algorithms (power of two in [16, 128]).
    impl: "auto", "recurrent", "chunked" or "pallas".
    kernel_config: settings of the Pallas kernels, `kernels_pallas.GpuConfig` or `TpuConfig`
      (hashable values: they key the jit cache). None: the measured defaults. Used when the
      implementation is "pallas" (also when "auto" picks it); an error with "recurrent"/"chunked".

  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
  """
  q, k, v, g, beta = map(jnp.asarray, (q, k, v, g, beta))
  initial_state = None if initial_state is None else jnp.asarray(initial_state)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl, scale, qk_norm_eps,
            kernel_config)
  B, T, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  impl = _resolve_impl(impl, jax.default_backend(), B, Hk, H, K, V)
  scale = K ** -0.5 if scale is None else float(scale)
  if use_qk_l2norm:
    q = l2_normalize(q, qk_norm_eps).astype(q.dtype)
    k = l2_normalize(k, qk_norm_eps).astype(k.dtype)
  h0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  reset = None
  if segment_ids is not None:  # a new document starts wherever the id changes (never at t = 0: h0 feeds it)
    reset = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                            axis=1)
  o, final_state = _REGISTRY[impl].run(q, k, v, g.astype(jnp.float32), beta.astype(jnp.float32),
                                      scale, h0, reset, chunk_size, kernel_config)
  return o.astype(v.dtype), (final_state if output_final_state else None)
