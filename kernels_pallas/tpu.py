r"""Mosaic TPU (Pallas) kernels for the chunked gated delta rule, forward and backward (`jax.custom_vjp`).

The per-chunk math is `chunk_math.py`, shared with the GPU kernel; this module only lays the arrays out
for Mosaic, walks the chunks and differentiates the chunk math.

Grid and memory (one program per (batch b, value head h, chunk n)):

    grid = (B, H, N)   dimension_semantics = ("parallel", "parallel", "arbitrary")

The chunk axis is last and "arbitrary": it is a sequential walk that carries the float32 state S (K×V)
in a VMEM scratch buffer across grid steps, so it must never be split across cores. Tiles are laid
out head-major so every block's last two dims obey Mosaic's (8, 128) rule:

    q, k   [B, Hk, T, K]      block (C, K)     value head h reads q/k head h // (H / Hk)
    v, o   [B, H, T, V]       block (C, V)
    g, β   [B, H, N, 1, C]    block (C,)       (a 1-D vector per chunk: the shared math's layout)
    reset  [B, N, 1, C]       block (C,)       (shared by all heads)
    h0, S  [B, H, K, V]       block (K, V)     (the same block for every n: resident across the walk)

(C, K) and (C, V) use the full K / V extent, so every K, V lowers; sizes below 128 pad the lanes
(speed only). The time axis is padded to N·C with g = β = k = v = 0 tokens, which leave S unchanged.

Forward: for each chunk, `chunk_math.chunk_forward`: the decays (Γ, d, w, λ), the UT transform W,
U, then Ṽ = U − W S, O = scale (Qd S + P Ṽ), S' = e^{γ_C} S + Kᵀ diag(w) Ṽ. Under
differentiation the forward also
writes the state entering every chunk, S_n [B, H, N, K, V] (O(T/C · K · V) per head, in the matmul
dtype: bf16 for bf16 inputs; no per-token state is ever stored).

Backward: the same grid with the chunk axis walked in reverse (index map n → N−1−n), carrying dS
(K×V, float32) in VMEM scratch, initialised with the cotangent of the final state. Each step
recomputes the chunk from (q, k, v, g, β, S_n) and applies the VJP of the shared chunk math
(`chunk_math.chunk_forward_vjp`) to (dO, dS'), which yields dq, dk, dv, dg, dβ of the chunk and dS_n = e^{γ_C} dS' + scale Qdᵀ dO − Wᵀ dṼ.
The within-chunk reverse cumsum of dg is the transpose of the shared masked row-sum (a reduction,
not a cumsum op). For grouped value heads the per-value-head dq, dk are summed over the group
outside the kernel.

Matmul precision, explicit per dot (`_explicit_precision` re-emits every dot of the traced chunk
math): float32 × float32 dots (the UT inverse A = (I + L)⁻¹ and the decay-weighted products and
their transposes, which carry the gate gradients) run at `lax.Precision.HIGHEST` (Mosaic contract
precision fp32); dots with a bf16 operand (K Kᵀ, Q Kᵀ, the W/U and state matmuls that the shared
policy `chunk_math.mm_dtype_for` casts to bf16 for bf16 inputs, and their VJP transposes, whose fp32
cotangent is rounded to bf16 as in fla's backward) run on the MXU in bf16 with fp32 accumulation.
With float32 inputs every dot is fp32.

Settings: a `TpuConfig` (`config.py`: interpret mode, the grid's dimension semantics), a static
argument of `gated_delta_rule_tpu`.

Cost: the backward recomputes the chunk and differentiates it (about 3× the forward's chunk
work), and the UT inverse by doubling is 2 (log₂C − 1) fp32 C×C matmuls per chunk. Both are
chunk-local; only the state walk is sequential.

What is proven without a TPU: interpret mode (`pltpu.InterpretParams`, CPU) against the float64
reference, `jax.export(..., platforms=["tpu"])` lowering, and (with the libtpu wheel) full Mosaic
compilation for v5e / v6e / v5p topologies. What awaits a TPU: speed, block tuning and numerics on
hardware; see README_tpu.md.
"""
from __future__ import annotations

import functools

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import chunk_math
from kernels_pallas.config import TpuConfig

_SQ = pl.Squeezed()  # a block dimension of size 1, dropped from the kernel's view of the ref


# --- explicit matmul precision ---------------------------------------------------------------

def _explicit_dot(x, y, params):
  """One `dot_general` of the traced chunk math with its operand dtypes and precision made explicit.

  float32 × float32 (the UT inverse, decay-weighted products and the gate-gradient terms) runs at
  Precision.HIGHEST (Mosaic contract precision fp32). A bf16 operand makes it an MXU-native bf16
  product with fp32 accumulation: a float32 partner (a cotangent in the VJP) is rounded to bf16, as
  fla's backward kernels do, instead of leaving a mixed-dtype matmul to Mosaic.
  """
  if x.dtype == jnp.float32 and y.dtype == jnp.float32:
    precision = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  else:
    low = x.dtype if x.dtype != jnp.float32 else y.dtype
    x, y = x.astype(low), y.astype(low)
    precision = None
  return jax.lax.dot_general(x, y, params["dimension_numbers"], precision=precision,
                             preferred_element_type=params["preferred_element_type"])


def _eval_explicit(jaxpr, consts, args):
  """Evaluates `jaxpr`, inlining `jit` sub-jaxprs and routing every dot through `_explicit_dot`."""
  env = {}
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is jax.lax.dot_general_p:
      outvals = [_explicit_dot(*invals, eqn.params)]
    elif "jaxpr" in eqn.params and isinstance(eqn.params["jaxpr"], jex_core.ClosedJaxpr):
      sub = eqn.params["jaxpr"]                     # `jit` of a jnp helper: inline it
      outvals = _eval_explicit(sub.jaxpr, sub.consts, invals)
    else:
      outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = outvals if eqn.primitive.multiple_results else [outvals]
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _explicit_precision(fn):
  """`fn` with every matmul's precision explicit (see `_explicit_dot`).

  The shared chunk math leaves precision unset (Triton and Mosaic disagree on what "default" means
  for fp32); here `fn` is traced once and its jaxpr re-evaluated in place with explicit dots. Inside
  a kernel body the re-emitted primitives are lowered by Mosaic as usual.
  """
  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = _eval_explicit(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat)

  return wrapped


# --- kernels ---------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref, h0_ref, *refs, scale, C,
                    mm_dtype, save_states):
  """One grid step (b, h, n): chunk n of value head h; the state walks in `h_scr` over n."""
  if save_states:
    o_ref, hT_ref, hn_ref, h_scr = refs
  else:
    o_ref, hT_ref, h_scr = refs
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    h_scr[...] = h0_ref[...]

  h_KxV = h_scr[...]
  if save_states:
    hn_ref[...] = h_KxV.astype(hn_ref.dtype)                # S entering chunk n, for the backward
  step = _explicit_precision(functools.partial(chunk_math.chunk_forward, scale=scale, C=C,
                                              mm_dtype=mm_dtype))
  o_CxV, h_next_KxV = step(q_ref[...], k_ref[...], v_ref[...], g_ref[...], beta_ref[...],
                           reset_ref[...], h_KxV)
  o_ref[...] = o_CxV.astype(o_ref.dtype)
  h_scr[...] = h_next_KxV

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    hT_ref[...] = h_next_KxV


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, reset_ref, hn_ref, do_ref, dhT_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, dh0_ref, dh_scr, *, scale, C,
                     mm_dtype):
  """One grid step (b, h, n) of the reverse walk: chunk N−1−n; dS walks backwards in `dh_scr`."""
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    dh_scr[...] = dhT_ref[...]

  step = _explicit_precision(functools.partial(chunk_math.chunk_forward_vjp, scale=scale, C=C,
                                              mm_dtype=mm_dtype))
  dq, dk, dv, dg, dbeta, dh = step(q_ref[...], k_ref[...], v_ref[...], g_ref[...], beta_ref[...],
                                   reset_ref[...], hn_ref[...].astype(jnp.float32),
                                   do_ref[...].astype(jnp.float32), dh_scr[...])
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dg_ref[...] = dg
  dbeta_ref[...] = dbeta
  dh_scr[...] = dh

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = dh


# --- pallas_call wrappers on the kernel layout -----------------------------------------------

def _specs(H, Hk, N, C, K, V, reverse):
  """BlockSpecs of the per-chunk inputs (q, k, v, g, β, reset) and of the per-(b, h) state."""
  group = H // Hk
  c = (lambda n: N - 1 - n) if reverse else (lambda n: n)
  qk = pl.BlockSpec((_SQ, _SQ, C, K), lambda b, h, n: (b, h // group, c(n), 0))
  per_chunk = [
      qk, qk,
      pl.BlockSpec((_SQ, _SQ, C, V), lambda b, h, n: (b, h, c(n), 0)),                 # v
      pl.BlockSpec((_SQ, _SQ, _SQ, _SQ, C), lambda b, h, n: (b, h, c(n), 0, 0)),       # g
      pl.BlockSpec((_SQ, _SQ, _SQ, _SQ, C), lambda b, h, n: (b, h, c(n), 0, 0)),       # β
      pl.BlockSpec((_SQ, _SQ, _SQ, C), lambda b, h, n: (b, c(n), 0, 0)),               # reset
  ]
  state = pl.BlockSpec((_SQ, _SQ, K, V), lambda b, h, n: (b, h, 0, 0))
  chunk_state = pl.BlockSpec((_SQ, _SQ, _SQ, K, V), lambda b, h, n: (b, h, c(n), 0, 0))
  return per_chunk, state, chunk_state


def _forward_call(q, k, v, g, beta, reset, h0, *, scale, C, config, save_states):
  B, Hk, Tp, K = q.shape
  H, V = v.shape[1], v.shape[3]
  N = Tp // C
  per_chunk, state, chunk_state = _specs(H, Hk, N, C, K, V, reverse=False)
  mm_dtype = chunk_math.mm_dtype_for(q.dtype)
  out_specs = [pl.BlockSpec((_SQ, _SQ, C, V), lambda b, h, n: (b, h, n, 0)), state]
  out_shape = [jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype),
               jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
  if save_states:
    out_specs.append(chunk_state)
    # Saved in the matmul dtype: the backward only feeds S_n to bf16 matmuls (and to the gradient
    # of e^{γ_C}), so bf16 inputs keep bf16 states, halving the O(T/C · K · V) residual like fla.
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), mm_dtype or jnp.float32))
  kernel = functools.partial(_forward_kernel, scale=scale, C=C, mm_dtype=mm_dtype,
                             save_states=save_states)
  return pl.pallas_call(
      kernel, grid=(B, H, N), in_specs=[*per_chunk, state], out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=config.dimension_semantics),
      interpret=config.interpret, name="gdn_chunk_fwd_tpu")(q, k, v, g, beta, reset, h0)


def _backward_call(q, k, v, g, beta, reset, h_chunks, do, dhT, *, scale, C, config):
  B, Hk, Tp, K = q.shape
  H, V = v.shape[1], v.shape[3]
  N = Tp // C
  per_chunk, state, chunk_state = _specs(H, Hk, N, C, K, V, reverse=True)
  rev = lambda b, h, n: (b, h, N - 1 - n, 0)
  rev_vec = lambda b, h, n: (b, h, N - 1 - n, 0, 0)
  out_specs = [pl.BlockSpec((_SQ, _SQ, C, K), rev), pl.BlockSpec((_SQ, _SQ, C, K), rev),
               pl.BlockSpec((_SQ, _SQ, C, V), rev),
               pl.BlockSpec((_SQ, _SQ, _SQ, _SQ, C), rev_vec),
               pl.BlockSpec((_SQ, _SQ, _SQ, _SQ, C), rev_vec), state]
  f32 = jnp.float32
  # dq, dk stay float32 only when value heads share q/k heads (summed over the group outside).
  dqk_dtype = q.dtype if H == Hk else f32
  out_shape = [jax.ShapeDtypeStruct((B, H, Tp, K), dqk_dtype),
               jax.ShapeDtypeStruct((B, H, Tp, K), dqk_dtype),
               jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype), jax.ShapeDtypeStruct(g.shape, f32),
               jax.ShapeDtypeStruct(beta.shape, f32), jax.ShapeDtypeStruct((B, H, K, V), f32)]
  kernel = functools.partial(_backward_kernel, scale=scale, C=C,
                             mm_dtype=chunk_math.mm_dtype_for(q.dtype))
  do_spec = pl.BlockSpec((_SQ, _SQ, C, V), rev)
  return pl.pallas_call(
      kernel, grid=(B, H, N), in_specs=[*per_chunk, chunk_state, do_spec, state],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((K, V), f32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=config.dimension_semantics),
      interpret=config.interpret, name="gdn_chunk_bwd_tpu")(q, k, v, g, beta, reset, h_chunks, do, dhT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _gdn_tpu(q, k, v, g, beta, reset, h0, scale, C, config):
  """The rule on the kernel layout (see the module docstring); reset is not differentiated."""
  o, hT = _forward_call(q, k, v, g, beta, reset, h0, scale=scale, C=C, config=config,
                        save_states=False)
  return o, hT


def _gdn_tpu_fwd(q, k, v, g, beta, reset, h0, scale, C, config):
  o, hT, h_chunks = _forward_call(q, k, v, g, beta, reset, h0, scale=scale, C=C,
                                  config=config, save_states=True)
  return (o, hT), (q, k, v, g, beta, reset, h_chunks)


def _gdn_tpu_bwd(scale, C, config, residuals, cotangents):
  q, k, v, g, beta, reset, h_chunks = residuals
  do, dhT = cotangents
  dq, dk, dv, dg, dbeta, dh0 = _backward_call(q, k, v, g, beta, reset, h_chunks, do,
                                              dhT.astype(jnp.float32), scale=scale, C=C,
                                              config=config)
  B, Hk, Tp, K = q.shape
  H = v.shape[1]
  if H != Hk:  # grouped value heads: q/k head j fed value heads j·G … j·G + G − 1 (float32 sum)
    dq, dk = (x.reshape(B, Hk, H // Hk, Tp, K).sum(axis=2) for x in (dq, dk))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta,
          jnp.zeros_like(reset), dh0)


_gdn_tpu.defvjp(_gdn_tpu_fwd, _gdn_tpu_bwd)


# --- public entry point ----------------------------------------------------------------------

def _check(q, k, v, g, beta, h0, reset, chunk_size):
  if (not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size > 128
      or chunk_size & (chunk_size - 1)):
    raise ValueError(f"gated_delta_rule_tpu: `chunk_size`={chunk_size!r}; expected a power of two "
                     "in [16, 128] (64 or 128 fill the TPU's 128-wide matrix unit best).")
  B, T, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  if k.shape != q.shape or v.shape[:2] != (B, T) or H % Hk:
    raise ValueError(f"gated_delta_rule_tpu: `q`, `k`, `v` have shapes {q.shape}, {k.shape}, "
                     f"{v.shape}; expected [B, T, Hk, K], [B, T, Hk, K], [B, T, H, V], H % Hk == 0.")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"gated_delta_rule_tpu: `q`, `k`, `v` have dtypes {q.dtype}, {k.dtype}, "
                     f"{v.dtype}; expected one dtype (float32 or bfloat16).")
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"gated_delta_rule_tpu: `q` has dtype {q.dtype}; expected float32 or "
                     "bfloat16 (the TPU matrix unit's operand types).")
  for name, x, shape in (("g", g, (B, T, H)), ("beta", beta, (B, T, H)), ("h0", h0, (B, H, K, V)),
                         ("reset", reset, (B, T))):
    if x.shape != shape:
      raise ValueError(f"gated_delta_rule_tpu: `{name}` has shape {x.shape}; expected {shape}.")


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "config"))
def gated_delta_rule_tpu(q, k, v, g, beta, scale, h0, reset, chunk_size,
                         config: TpuConfig | None = None):
  """Chunked gated delta rule with the Mosaic TPU kernels (differentiable: custom VJP).

  Args:
    q, k: [B, T, Hk, K] float32 or bfloat16 (already L2-normalised if asked).
    v: [B, T, H, V], same dtype, H % Hk == 0 (value head h reads q/k head h // (H / Hk)).
    g, beta: [B, T, H] float32 log decay and write strength.
    scale: Python float readout scale.
    h0: [B, H, K, V] float32 initial state.
    reset: [B, T] bool, True where a packed document starts (state zeroed before that token).
    chunk_size: C, a power of two in [16, 128].
    config: `TpuConfig` (None: the default, compiled for the TPU; `TpuConfig(interpret=True)` or
      `TpuConfig(interpret=pltpu.InterpretParams(...))` runs the interpreter, e.g. in CPU tests).
      scale, chunk_size and config are static: they key the jit cache.

  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32).
  """
  _check(q, k, v, g, beta, h0, reset, chunk_size)
  B, T, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  C = chunk_size
  N = -(-T // C)
  Tp = N * C

  def heads_major(x):  # [B, T, h, d] → [B, h, Tp, d]; padding tokens (zeros) leave S unchanged
    return jnp.swapaxes(jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, 0)]), 1, 2)

  def chunk_vectors(x_BxTxH):  # [B, T, H] → [B, H, N, 1, C] float32
    x = jnp.pad(x_BxTxH.astype(jnp.float32), [(0, 0), (0, Tp - T), (0, 0)])
    return jnp.moveaxis(x, 2, 1).reshape(B, H, N, 1, C)

  config = TpuConfig() if config is None else config
  reset_l = jnp.pad(reset.astype(jnp.float32), [(0, 0), (0, Tp - T)]).reshape(B, N, 1, C)
  o, hT = _gdn_tpu(heads_major(q), heads_major(k), heads_major(v), chunk_vectors(g),
                   chunk_vectors(beta), reset_l, h0.astype(jnp.float32), float(scale), C,
                   config)
  return jnp.swapaxes(o, 1, 2)[:, :T], hT
