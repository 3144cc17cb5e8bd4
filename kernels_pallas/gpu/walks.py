r"""The two sequential state walks over chunks (`gdn_walk_fwd`, `gdn_walk_bwd`): all that is sequential.

Grid (V/BV, B, H): one program per (V-block, batch row, value head) walks all N chunks in a
`fori_loop`, carrying its K×BV block of the state in registers. The V-blocks of one head come first
(`layout` explains why: they read the same W and k tiles). k, q, g, dO are read in token layout and
the per-token decays (w, d, λ) are formed from g inside the loop (`chunk_math.chunk_vector_decays`):
no K̃ = diag(w) K or Q̃ goes through HBM, and the C×BV values are scaled rather than the C×K keys.

    forward, r = 0 … N−1:   Ṽ_r = U_r − W_r h_r,   h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r
    reverse, r = N−1 … 0:   dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1},
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


def _walk_fwd_kernel(w_ref, u_ref, k_ref, g_ref, reset_ref, h0_ref, vnew_ref, ht_ref, hs_ref, *,
                     N, C, mm_dtype):
  """h_r → Ṽ_r = U_r − W_r h_r → h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r, for r = 0 … N−1 (one V-block)."""
  def body(r, h_KxV):
    rows = pl.ds(pl.multiple_of(r * C, C), C)
    _, _, _, k_write, lam = cm.chunk_vector_decays(g_ref[rows], reset_ref[rows], C)
    hs_ref[r] = h_KxV.astype(hs_ref.dtype)
    v_new = cm.pseudo_values(h_KxV, w_ref[r], u_ref[r], mm_dtype)
    vnew_ref[r] = v_new.astype(vnew_ref.dtype)
    return cm.next_state(h_KxV, k_ref[rows, :], k_write, lam, v_new, mm_dtype)

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...].astype(jnp.float32))


def _walk_bwd_kernel(*refs, N, C, scale, mm_dtype, from_a):
  """dh_{r+1} → dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1} →
  dh_r = λ_r dh_{r+1} + scale Q_rᵀ diag(d_r) dO_r − W_rᵀ dṼ_r, for r = N−1 … 0 (one V-block).
  The first ref holds W's tiles, or with `from_a` A's, and then a β ref follows g's: Wᵀ dṼ is
  formed as Kbᵀ (Aᵀ dṼ), Kb = diag(β d) K from the k tile the step loads anyway
  (`GpuConfig.walk_bwd_from_a`)."""
  if from_a:
    (tiles_ref, k_ref, q_ref, g_ref, beta_ref, reset_ref, do_ref, dvl_ref, dht_ref,
     dh0_ref, dhs_ref, dvnew_ref) = refs
  else:
    (tiles_ref, k_ref, q_ref, g_ref, reset_ref, do_ref, dvl_ref, dht_ref,
     dh0_ref, dhs_ref, dvnew_ref) = refs

  def body(i, dh_KxV):
    r = N - 1 - i
    rows = pl.ds(pl.multiple_of(r * C, C), C)
    _, _, d, k_write, lam = cm.chunk_vector_decays(g_ref[rows], reset_ref[rows], C)
    dhs_ref[r] = dh_KxV.astype(dhs_ref.dtype)
    k = k_ref[rows, :]
    dv_new = cg.pseudo_value_grad(dvl_ref[r], k, k_write, dh_KxV, mm_dtype)
    dvnew_ref[r] = dv_new.astype(dvnew_ref.dtype)
    dh_local = cg.local_state_grad(q_ref[rows, :], d, do_ref[rows, :], scale, mm_dtype)
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


def walk_forward(W, U, k, g, reset_f, h0, *, config: GpuConfig):
  """The forward walk. W [B,H,N,C,K], U [B,H,N,C,V] tiles (as `prep` wrote them); k [B,Tp,Hk,K],
  g [B,Tp,H], reset_f [B,Tp] in token layout; h0 [B,H,K,V] f32.
  Returns (Ṽ [B,H,N,C,V], final state [B,H,K,V] f32, state before each chunk [B,H,N,K,V]); Ṽ and the
  states in W's dtype."""
  B, H, N, C, K = W.shape
  V = U.shape[-1]
  cfg = config.resolve(B, H, K, V)
  specs = walk_specs(N, C, K, cfg.walk_block_v, H // k.shape[2])
  kernel = functools.partial(_walk_fwd_kernel, N=N, C=C, mm_dtype=cm.mm_dtype_for(W.dtype))
  return _walk_call(
      kernel, W, V, cfg, "gdn_walk_fwd",
      in_specs=[specs.tile_k,    # W
                specs.tile_v,    # U
                specs.qk,        # k
                specs.gate,      # g
                specs.reset,     # reset
                specs.state],    # h0
      out_specs=[specs.tile_v,   # Ṽ
                 specs.state,    # final state
                 specs.states],  # h_r
      out_shape=[jax.ShapeDtypeStruct(U.shape, W.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), W.dtype)],
  )(W, U, k, g, reset_f, h0)


def walk_backward(W, k, q, g, reset_f, do, dv_local, dht, *, scale: float, config: GpuConfig,
                  beta=None):
  """The reverse walk. W, dṼ^local [B,H,N,C,·] tiles; k, q [B,Tp,Hk,K], g [B,Tp,H], reset_f [B,Tp],
  dO [B,Tp,H,V] in token layout; dht [B,H,K,V] f32, the final state's cotangent. With β [B,Tp,H]
  given, W is A [B,H,N,C,C] instead (`GpuConfig.walk_bwd_from_a`: Wᵀ dṼ = (diag(βd) K)ᵀ (Aᵀ dṼ)).
  Returns (dh0 [B,H,K,V] f32, dh_{r+1} per chunk [B,H,N,K,V], dṼ [B,H,N,C,V]); the last two in W's
  dtype."""
  B, H, N, C = W.shape[:4]
  K, V = k.shape[-1], do.shape[-1]
  cfg = config.resolve(B, H, K, V)
  specs = walk_specs(N, C, K, cfg.walk_block_v, H // k.shape[2])
  from_a = beta is not None
  kernel = functools.partial(_walk_bwd_kernel, N=N, C=C, scale=scale,
                             mm_dtype=cm.mm_dtype_for(W.dtype), from_a=from_a)
  if from_a:
    first, gates = [specs.tile_c], [specs.gate, specs.gate]         # A; g, β
    operands = (W, k, q, g, beta, reset_f, do, dv_local, dht)
  else:
    first, gates = [specs.tile_k], [specs.gate]                     # W; g
    operands = (W, k, q, g, reset_f, do, dv_local, dht)
  return _walk_call(
      kernel, W, V, cfg, "gdn_walk_bwd",
      in_specs=first + [specs.qk,      # k
                        specs.qk]      # q
               + gates + [specs.reset,     # reset
                          specs.v,         # dO
                          specs.tile_v,    # dṼ^local
                          specs.state],    # dht
      out_specs=[specs.state,    # dh0
                 specs.states,   # dh_{r+1}
                 specs.tile_v],  # dṼ
      out_shape=[jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, N, K, V), W.dtype),
                 jax.ShapeDtypeStruct(dv_local.shape, W.dtype)],
  )(*operands)
