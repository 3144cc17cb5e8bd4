"""`gated_delta_rule`: one public entry point for every implementation of the rule.

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ     (S: K×V, float32)
    o_t = scale · S_tᵀ q_t

Layout is fla's: [batch, time, heads, dim]. Value heads may outnumber q/k heads
(grouped value attention, GVA): value head h reads q/k head h // (H / Hk).

Implementations (all take the same validated, pre-processed inputs):
  * "recurrent": `lax.scan` over time, the readable reference (`recurrent.py`).
  * "chunked":   chunkwise-parallel WY / UT-transform algorithm in pure JAX (`chunked.py`).
  * "pallas":    the Pallas kernels in `kernels_pallas` (GPU: Triton; TPU: Mosaic).
  * "auto":      the fastest correct one for the default backend.
"""
from __future__ import annotations

import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from gdn_jax.ops.chunked import chunked_gated_delta_rule
from gdn_jax.ops.recurrent import recurrent_gated_delta_rule

IMPLS = ("auto", "recurrent", "chunked", "pallas")
L2NORM_EPS = 1e-6


def l2_normalize(x, eps: float = L2NORM_EPS):
  """x / sqrt(Σ x² + eps) over the last axis, in float32 (fla's l2norm)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def _expand_heads(x_BxTxHkxD, num_heads: int):
  """Broadcast q/k heads to the value heads (value head h reads h // group)."""
  group = num_heads // x_BxTxHkxD.shape[2]
  return x_BxTxHkxD if group == 1 else jnp.repeat(x_BxTxHkxD, group, axis=2)


def _recurrent(q, k, v, g, beta, scale, h0, reset, chunk_size):
  del chunk_size
  H = v.shape[2]
  return recurrent_gated_delta_rule(_expand_heads(q, H), _expand_heads(k, H), v, g, beta,
                                    scale, h0, reset)


def _pallas(q, k, v, g, beta, scale, h0, reset, chunk_size):
  # Imported lazily: the kernels are an optional layer above the pure-JAX ops.
  kernels = importlib.import_module("kernels_pallas")
  return kernels.gated_delta_rule_pallas(q, k, v, g, beta, scale, h0, reset, chunk_size)


_DISPATCH: dict[str, Callable] = {
    "recurrent": _recurrent,
    "chunked": chunked_gated_delta_rule,
    "pallas": _pallas,
}


def default_impl(backend: str | None = None, K: int | None = None, V: int | None = None,
                 num_devices: int = 1) -> str:
  """The implementation "auto" resolves to on `backend` (default: jax's default backend), for
  head dims K, V when given, in a program over `num_devices` devices.

  TPU: the Mosaic kernel (`kernels_pallas/tpu.py`). GPU: the Pallas kernels (XLA chunk operators
  + Triton state walks), measured 1.7–1.8× faster than "chunked" for forward+backward on the H100
  (experiments/results/bench_kernels_h100_v4c.md), unless K or V is not a power of two ≥ 16.
  On several devices: "chunked", because XLA cannot partition a Pallas custom call over a
  batch- or head-sharded program (it would gather the inputs onto every device); the kernels
  need a `jax.shard_map` around them there, which the layer does not do yet.
  CPU: "chunked" (the recurrent scan is faster forward-only, chunked is faster for training).
  """
  backend = backend or jax.default_backend()
  if backend in ("tpu", "gpu", "cuda") and num_devices == 1:
    try:
      kernels = importlib.import_module("kernels_pallas")
    except ImportError:
      return "chunked"
    fits = K is None or V is None or kernels.unsupported_shape(backend, K, V) is None
    if kernels.supports_backend(backend) and fits:
      return "pallas"
  return "chunked"


def _shape_error(name, got, expected):
  return ValueError(f"gated_delta_rule: `{name}` has shape {tuple(got)}, expected {expected}.")


def _check_float(name, x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"gated_delta_rule: `{name}` has dtype {x.dtype}; expected a floating dtype "
                     f"(float32, bfloat16, float16). Cast it with `{name}.astype(jnp.float32)`.")


def _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl, scale,
              qk_norm_eps):
  if impl not in IMPLS:
    raise ValueError(f"gated_delta_rule: unknown `impl`={impl!r}; expected one of {IMPLS}.")
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
                     impl: str = "auto"):
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

  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
  """
  q, k, v, g, beta = map(jnp.asarray, (q, k, v, g, beta))
  initial_state = None if initial_state is None else jnp.asarray(initial_state)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  _validate(q, k, v, g, beta, initial_state, segment_ids, chunk_size, impl, scale, qk_norm_eps)
  B, T, _, K = q.shape
  H, V = v.shape[2], v.shape[3]
  if impl == "auto":
    impl = default_impl(K=K, V=V, num_devices=jax.device_count())
  elif impl == "pallas":
    backend = jax.default_backend()
    why = importlib.import_module("kernels_pallas").unsupported_shape(backend, K, V)
    if why is not None:
      raise ValueError(f"gated_delta_rule: impl='pallas' on {backend}: {why}; use impl='chunked'.")
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
  o, final_state = _DISPATCH[impl](q, k, v, g.astype(jnp.float32), beta.astype(jnp.float32),
                                   scale, h0, reset, chunk_size)
  return o.astype(v.dtype), (final_state if output_final_state else None)
