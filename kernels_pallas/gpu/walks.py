r"""The two sequential state walks over chunks (`gdn_walk_fwd`, `gdn_walk_bwd`): all that is sequential.

Grid (V/BV, B, H): one program per (V-block, batch row, value head) walks all N chunks in a
`fori_loop`, carrying its K×BV block of the state in registers. The V-blocks of one head come first
(`layout` explains why: they read the same W and k tiles). k, q, g, dO are read in token layout and
the per-token decays (w, d, λ) are formed from g inside the loop (`chunk_math.chunk_vector_decays`):
no K̃ = diag(w) K or Q̃ goes through HBM, and the C×BV values are scaled rather than the C×K keys.

    forward, r = 0 … N−1:   Ṽ_r = U_r − W_r h_r,   h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r
                            (or Ṽ_r = A_r (diag(β_r) V_r − diag(β_r d_r) K_r h_r) from A)
    reverse, r = N−1 … 0:   dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1}   (dṼ_r^local = scale P_rᵀ dO_r
                            read, or formed in the walk),
                            dh_r = λ_r dh_{r+1} + scale Q_rᵀ diag(d_r) dO_r − W_rᵀ dṼ_r

The dtype of W (as `prep` stores it: bf16 for bf16 inputs) is the dtype of the stored states, Ṽ and
dṼ, and picks the matmul operands (`chunk_math.mm_dtype_for`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import chunk_grads as cg
from kernels_pallas import chunk_math as cm
from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu import layout


def _walk_fwd_kernel(*refs, N, C, mm_dtype, from_a, scale, save):
  """h_r → Ṽ_r = U_r − W_r h_r → h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r, for r = 0 … N−1 (one V-block).

  Refs in order: W and U tiles, or with `from_a` A's tiles and v in token layout
  (Ṽ_r = A_r (diag(β) V_r − diag(β d) K_r h_r), `GpuConfig.walk_fwd_from_a`); k; q where `scale`
  is given; g; β with `from_a`; reset; h0. Then the outputs: O where `scale` is given
  (O_r = scale (diag(d_r) Q_r h_r + P_r Ṽ_r), P_r = (Q_r K_rᵀ) ⊙ Γ_r, `GpuConfig.walk_fwd_output`);
  the final state; Ṽ and h_r where `save` (what the backward reads)."""
  refs = list(refs)
  take = lambda cond=True: refs.pop(0) if cond else None
  tiles_ref, values_ref, k_ref = take(), take(), take()
  with_output = scale is not None
  q_ref, g_ref, beta_ref, reset_ref, h0_ref = (take(with_output), take(), take(from_a), take(),
                                               take())
  o_ref, ht_ref, vnew_ref, hs_ref = take(with_output), take(), take(save), take(save)

  def body(r, h_KxV):
    rows = pl.ds(pl.multiple_of(r * C, C), C)
    if with_output:
      Gamma, d, k_write, lam = cm.chunk_decays(g_ref[rows], reset_ref[rows], C)
    else:
      _, _, d, k_write, lam = cm.chunk_vector_decays(g_ref[rows], reset_ref[rows], C)
    if save:
      hs_ref[r] = h_KxV.astype(hs_ref.dtype)
    k = k_ref[rows, :]
    if from_a:
      v_new = cm.pseudo_values_direct(h_KxV, tiles_ref[r], k, values_ref[rows, :],
                                      beta_ref[rows], d, mm_dtype)
    else:
      v_new = cm.pseudo_values(h_KxV, tiles_ref[r], values_ref[r], mm_dtype)
    if save:
      vnew_ref[r] = v_new.astype(vnew_ref.dtype)
    if with_output:
      q = q_ref[rows, :]
      o = cm.chunk_output(h_KxV, d[:, None] * q.astype(jnp.float32),
                          cm.decayed_scores(q, k, Gamma), v_new, scale, mm_dtype)
      o_ref[rows, :] = o.astype(o_ref.dtype)
    return cm.next_state(h_KxV, k, k_write, lam, v_new, mm_dtype)

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...].astype(jnp.float32))


def _walk_bwd_kernel(*refs, N, C, scale, mm_dtype, from_a, local):
  """dh_{r+1} → dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1} →
  dh_r = λ_r dh_{r+1} + scale Q_rᵀ diag(d_r) dO_r − W_rᵀ dṼ_r, for r = N−1 … 0 (one V-block).
  The first ref holds W's tiles, or with `from_a` A's, and then a β ref follows g's: Wᵀ dṼ is
  formed as Kbᵀ (Aᵀ dṼ), Kb = diag(β d) K from the k tile the step loads anyway
  (`GpuConfig.walk_bwd_from_a`). With `local` there is no dṼ^local ref: the step forms
  dṼ^local = scale Pᵀ dO_r, P = (Q_r K_rᵀ) ⊙ Γ_r, from the q, k and dO it loads anyway
  (`GpuConfig.walk_bwd_dv_local`)."""
  refs = list(refs)
  take = lambda cond=True: refs.pop(0) if cond else None
  tiles_ref, k_ref, q_ref, g_ref = take(), take(), take(), take()
  beta_ref, reset_ref, do_ref, dvl_ref = take(from_a), take(), take(), take(not local)
  dht_ref, dh0_ref, dhs_ref, dvnew_ref = take(), take(), take(), take()

  def body(i, dh_KxV):
    r = N - 1 - i
    rows = pl.ds(pl.multiple_of(r * C, C), C)
    if local:
      Gamma, d, k_write, lam = cm.chunk_decays(g_ref[rows], reset_ref[rows], C)
    else:
      _, _, d, k_write, lam = cm.chunk_vector_decays(g_ref[rows], reset_ref[rows], C)
    dhs_ref[r] = dh_KxV.astype(dhs_ref.dtype)
    k, q, do = k_ref[rows, :], q_ref[rows, :], do_ref[rows, :]
    if local:
      dv_local = cg.local_pseudo_value_grad(cm.decayed_scores(q, k, Gamma), do, scale, mm_dtype)
    else:
      dv_local = dvl_ref[r]
    dv_new = cg.pseudo_value_grad(dv_local, k, k_write, dh_KxV, mm_dtype)
    dvnew_ref[r] = dv_new.astype(dvnew_ref.dtype)
    dh_local = cg.local_state_grad(q, d, do, scale, mm_dtype)
    if from_a:   # (Kb, Aᵀ dṼ) in place of (W, dṼ): Wᵀ dṼ = Kbᵀ Aᵀ dṼ
      W = (beta_ref[rows] * d)[:, None] * k.astype(jnp.float32)
      dv_new = cm.dot(tiles_ref[r], dv_new, trans_a=True, mm_dtype=mm_dtype)
    else:
      W = tiles_ref[r]
    return cg.state_grad(dh_KxV, lam, dh_local, W, dv_new, mm_dtype)

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dht_ref[...].astype(jnp.float32))


class WalkSpecs(NamedTuple):
  """BlockSpecs of a walk program, grid (V/BV, B, H): it sees the whole sequence of its head."""
  tile_k: pl.BlockSpec   # W tiles [N, C, K] of its head (chunk r: ref[r])
  tile_c: pl.BlockSpec   # A tiles [N, C, C] of its head
  tile_v: pl.BlockSpec   # [N, C, BV] tiles of its V-block: U, Ṽ, dṼ^local, dṼ
  state: pl.BlockSpec    # [K, BV]: h0, the final state, its cotangent, dh0
  states: pl.BlockSpec   # [N, K, BV], one state per chunk: h_r, dh_{r+1}
  qk: pl.BlockSpec       # q or k [Tp, K], token layout, q/k head h // G (chunk r: ref[pl.ds(r·C, C)])
  v: pl.BlockSpec        # [Tp, BV] value columns in token layout: dO
  gate: pl.BlockSpec     # g [Tp]
  reset: pl.BlockSpec    # reset flags [Tp]


def walk_specs(N: int, C: int, K: int, BV: int, G: int) -> WalkSpecs:
  """`WalkSpecs` for N chunks of C tokens, head dim K, BV value columns per program and G value
  heads per q/k head."""
  Tp = N * C
  return WalkSpecs(
      tile_k=pl.BlockSpec((None, None, N, C, K), lambda j, b, h: (b, h, 0, 0, 0)),
      tile_c=pl.BlockSpec((None, None, N, C, C), lambda j, b, h: (b, h, 0, 0, 0)),
      tile_v=pl.BlockSpec((None, None, N, C, BV), lambda j, b, h: (b, h, 0, 0, j)),
      state=pl.BlockSpec((None, None, K, BV), lambda j, b, h: (b, h, 0, j)),
      states=pl.BlockSpec((None, None, N, K, BV), lambda j, b, h: (b, h, 0, 0, j)),
      qk=pl.BlockSpec((None, Tp, None, K), lambda j, b, h: (b, 0, h // G, 0)),
      v=pl.BlockSpec((None, Tp, None, BV), lambda j, b, h: (b, 0, h, j)),
      gate=pl.BlockSpec((None, Tp, None), lambda j, b, h: (b, 0, h)),
      reset=pl.BlockSpec((None, Tp), lambda j, b, h: (b, 0)))


def _walk_call(kernel, W, V: int, cfg: GpuConfig, name: str, *, in_specs, out_specs, out_shape):
  B, H = W.shape[:2]
  return pl.pallas_call(
      kernel, grid=(V // cfg.walk_block_v, B, H), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.interpret,
      compiler_params=layout.compiler_params(cfg.walk_num_warps, cfg.walk_num_stages), name=name)


class ForwardWalk(NamedTuple):
  """What `walk_forward` returns; None where not asked for."""
  v_new: jax.Array | None   # Ṽ [B,H,N,C,V] (save)
  final: jax.Array          # the final state [B,H,K,V] f32
  states: jax.Array | None  # h_r, the state before each chunk [B,H,N,K,V] (save)
  o: jax.Array | None       # O [B,Tp,H,V] in v's dtype (q given)


def walk_forward(W, U, k, g, reset_f, h0, *, config: GpuConfig, beta=None, q=None,
                 scale: float | None = None, o_dtype=None, save: bool = True) -> ForwardWalk:
  """The forward walk. W [B,H,N,C,K], U [B,H,N,C,V] tiles (as `prep` wrote them); k [B,Tp,Hk,K],
  g [B,Tp,H], reset_f [B,Tp] in token layout; h0 [B,H,K,V] f32. With β [B,Tp,H] given, W is A
  [B,H,N,C,C] and U is v [B,Tp,H,V] in token layout instead (`GpuConfig.walk_fwd_from_a`:
  Ṽ = A (diag(β) V − diag(βd) K h)). With q [B,Tp,Hk,K] and `scale` given the walk also writes O
  [B,Tp,H,V] in `o_dtype` (None: q's; `GpuConfig.walk_fwd_output`), and `save=False` (only with q)
  skips Ṽ and h_r, which only the backward reads. Ṽ and the states are in W's dtype."""
  B, H, N, C = W.shape[:4]
  K, V = k.shape[-1], U.shape[-1]
  if q is None and (scale is not None or not save):
    raise ValueError("walk_forward: `scale` and save=False need q (the walk's output).")
  if q is not None and scale is None:
    raise ValueError("walk_forward: q given without `scale`; expected both or neither.")
  cfg = config.resolve(B, H, K, V)
  specs = walk_specs(N, C, K, cfg.walk_block_v, H // k.shape[2])
  from_a = beta is not None
  kernel = functools.partial(_walk_fwd_kernel, N=N, C=C, mm_dtype=cm.mm_dtype_for(W.dtype),
                             from_a=from_a, scale=scale, save=save)
  inputs = [(W, specs.tile_c if from_a else specs.tile_k),     # A or W
            (U, specs.v if from_a else specs.tile_v),          # v or U
            (k, specs.qk)]
  inputs += [(q, specs.qk)] if q is not None else []
  inputs += [(g, specs.gate)] + ([(beta, specs.gate)] if from_a else [])
  inputs += [(reset_f, specs.reset), (h0, specs.state)]
  outputs = []
  if q is not None:
    outputs += [(jax.ShapeDtypeStruct((B, N * C, H, V), o_dtype or q.dtype), specs.v)]   # O
  outputs += [(jax.ShapeDtypeStruct((B, H, K, V), jnp.float32), specs.state)]
  if save:
    outputs += [(jax.ShapeDtypeStruct((B, H, N, C, V), W.dtype), specs.tile_v),      # Ṽ
                (jax.ShapeDtypeStruct((B, H, N, K, V), W.dtype), specs.states)]     # h_r
  out = list(_walk_call(
      kernel, W, V, cfg, "gdn_walk_fwd",
      in_specs=[spec for _, spec in inputs], out_specs=[spec for _, spec in outputs],
      out_shape=[shape for shape, _ in outputs])(*[x for x, _ in inputs]))
  o = out.pop(0) if q is not None else None
  final = out.pop(0)
  v_new, states = (out.pop(0), out.pop(0)) if save else (None, None)
  return ForwardWalk(v_new, final, states, o)


def walk_backward(W, k, q, g, reset_f, do, dv_local, dht, *, scale: float, config: GpuConfig,
                  beta=None):
  """The reverse walk. W, dṼ^local [B,H,N,C,·] tiles; k, q [B,Tp,Hk,K], g [B,Tp,H], reset_f [B,Tp],
  dO [B,Tp,H,V] in token layout; dht [B,H,K,V] f32, the final state's cotangent. With β [B,Tp,H]
  given, W is A [B,H,N,C,C] instead (`GpuConfig.walk_bwd_from_a`: Wᵀ dṼ = (diag(βd) K)ᵀ (Aᵀ dṼ)).
  dṼ^local None: the walk forms it (`GpuConfig.walk_bwd_dv_local`).
  Returns (dh0 [B,H,K,V] f32, dh_{r+1} per chunk [B,H,N,K,V], dṼ [B,H,N,C,V]); the last two in W's
  dtype."""
  B, H, N, C = W.shape[:4]
  K, V = k.shape[-1], do.shape[-1]
  cfg = config.resolve(B, H, K, V)
  specs = walk_specs(N, C, K, cfg.walk_block_v, H // k.shape[2])
  from_a, local = beta is not None, dv_local is None
  kernel = functools.partial(_walk_bwd_kernel, N=N, C=C, scale=scale,
                             mm_dtype=cm.mm_dtype_for(W.dtype), from_a=from_a, local=local)
  inputs = [(W, specs.tile_c if from_a else specs.tile_k),    # A or W
            (k, specs.qk), (q, specs.qk), (g, specs.gate)]
  inputs += [(beta, specs.gate)] if from_a else []
  inputs += [(reset_f, specs.reset), (do, specs.v)]
  inputs += [] if local else [(dv_local, specs.tile_v)]       # dṼ^local
  inputs += [(dht, specs.state)]
  return _walk_call(
      kernel, W, V, cfg, "gdn_walk_bwd",
      in_specs=[spec for _, spec in inputs],
      out_specs=[specs.state,    # dh0
                 specs.states,   # dh_{r+1}
                 specs.tile_v],  # dṼ
      out_shape=[jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), W.dtype),
                 jax.ShapeDtypeStruct((B, H, N, C, V), W.dtype)],
  )(*[x for x, _ in inputs])
