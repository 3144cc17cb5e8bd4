r"""Sequence (context) parallelism for the gated delta rule: time split over a mesh axis.

Each device on the `seq` axis holds a contiguous shard of T/n tokens. For fixed (q, k, v, g, β)
the rule is affine in its initial state: with M_t = e^{g_t}(I − β_t k_t k_tᵀ) (K×K per value
head) and P_{≤t} = M_t ⋯ M_1 over a shard,

    S_t = P_{≤t} S_in + S_t⁽⁰⁾,        o_t = o_t⁽⁰⁾ + S_inᵀ r_t,   r_t = scale · P_{≤t}ᵀ q_t,

where ⁽⁰⁾ marks the rule run from a zero state. Every term comes out of ONE call of the public
`gated_delta_rule` per shard, on values widened by K zero columns with the initial state [0 | I]:
the extra columns' state is M_t ⋯ M_1 · I = P_{≤t} (its value input is 0), so their output is r_t
and their final state is the shard's transition P = P_{≤T/n}:

    gated_delta_rule(q, k, [v | 0], g, β, initial_state=[0 | I]) = ([o⁽⁰⁾ | r], [S⁽⁰⁾ | P]).

Shard j's state is then the map S ↦ P_j S + S_j⁽⁰⁾, and the state entering shard j is the
composition of shards 0 … j−1 applied to the global initial state, which shard 0 takes directly
(its own call starts from [S₀ | I]). The maps compose associatively,

    (P_b, S_b) ∘ (P_a, S_a) = (P_b P_a, P_b S_a + S_b)      (a before b),

so an inclusive Hillis–Steele scan over the devices (log2 n rounds of `ppermute` of (P, S),
K×(K+V) floats per head) gives every shard the state after it; a shift by one device gives the
state entering it, S_in, and each shard adds S_inᵀ r_t to its outputs. The last shard's state is
the final state.

Why correct rather than recompute: the shard needs P anyway (K extra state columns), and the
widened call shares the chunk operators (A = (I + L)⁻¹, decays) between the V value columns and
the K columns of P; a second pass with the right initial state would redo the whole rule, while
the correction is one [T/n, K] × [K, V] matmul per head.

Packed documents (`segment_ids`): a reset inside a shard zeroes the state there, so the rule
itself zeroes P_{≤t} (and r_t) from the first reset on: later tokens ignore S_in, and a shard
holding a reset passes on P = 0, blocking everything before it. A document starting exactly at
a shard boundary (the id changes between the previous shard's last token and this shard's
first) is a reset the per-shard call cannot see: that shard's P and r are zeroed (its first id
is compared with the previous shard's last, received by `ppermute`).

Gradients: jax differentiates through `shard_map`, `ppermute` and `psum` (reversed
permutations); the per-shard rule keeps its own backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gdn_jax.ops import gated_delta_rule

_HI = lax.Precision.HIGHEST  # the scan and correction are tiny: never TF32 on GPUs


def _shift(x, axis: str, n: int, d: int):
  """x of device j − d on device j (zeros for j < d)."""
  return lax.ppermute(x, axis, [(i, i + d) for i in range(n - d)])


def _place(x, mesh: Mesh, spec: P):
  """x laid out on `spec` over the mesh's Explicit axes (`jax.make_mesh`'s default), which
  `shard_map` does not reshard by itself; Auto axes are left to it."""
  if x is None:
    return x
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  explicit = P(*(a if a is not None and types[a] == AxisType.Explicit else None for a in spec))
  if all(a is None for a in explicit):
    return x
  return jax.reshard(x, NamedSharding(mesh, explicit))


def _state_after_shard(P_BxHxKxK, S_BxHxKxV, axis: str, n: int):
  """Inclusive scan over the devices of `axis` of the maps S ↦ P_j S + S_j: the state after
  shard j (Hillis–Steele: after the round with offset d, device j holds the composition of
  shards max(0, j − 2d + 1) … j)."""
  j = lax.axis_index(axis)
  d = 1
  while d < n:
    has_prev = j >= d
    S_prev = _shift(S_BxHxKxV, axis, n, d)
    S_BxHxKxV = jnp.where(has_prev, jnp.matmul(P_BxHxKxK, S_prev, precision=_HI) + S_BxHxKxV,
                          S_BxHxKxV)
    if 2 * d < n:  # the last round needs no P
      P_prev = _shift(P_BxHxKxK, axis, n, d)
      P_BxHxKxK = jnp.where(has_prev, jnp.matmul(P_BxHxKxK, P_prev, precision=_HI), P_BxHxKxK)
    d *= 2
  return S_BxHxKxV


def _shard(q, k, v, g, beta, h0_BxHxKxV, segment_ids, *, axis, n, rule_kw, final):
  B, T, H, V = v.shape  # T: this shard's tokens
  K = q.shape[-1]
  first = lax.axis_index(axis) == 0
  # Columns [0, V): the values, from the global initial state on shard 0 and zero elsewhere.
  # Columns [V, V + K): value 0 from the state I, which carries P_{≤t} (module docstring).
  v_aug = jnp.concatenate([v, jnp.zeros((B, T, H, K), v.dtype)], axis=-1)
  eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, H, K, K))
  h0 = jnp.where(first, h0_BxHxKxV, 0.0)
  o_aug, S_aug = gated_delta_rule(q, k, v_aug, g, beta,
                                  initial_state=jnp.concatenate([h0, eye], axis=-1),
                                  output_final_state=True, segment_ids=segment_ids, **rule_kw)
  o0_BxTxHxV, r_BxTxHxK = o_aug[..., :V], o_aug[..., V:].astype(jnp.float32)
  S0_BxHxKxV, P_BxHxKxK = S_aug[..., :V], S_aug[..., V:]
  if segment_ids is not None:  # a document starting at this shard's first token blocks S_in
    prev_last = _shift(segment_ids[:, -1], axis, n, 1)
    keep_B = (first | (segment_ids[:, 0] == prev_last)).astype(jnp.float32)
    P_BxHxKxK = P_BxHxKxK * keep_B[:, None, None, None]
    r_BxTxHxK = r_BxTxHxK * keep_B[:, None, None, None]
  S_after = _state_after_shard(P_BxHxKxK, S0_BxHxKxV, axis, n)
  S_in = _shift(S_after, axis, n, 1)  # zero on shard 0, whose call already started from S₀
  o = o0_BxTxHxV.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", r_BxTxHxK, S_in,
                                                   precision=_HI)
  if not final:
    return o.astype(v.dtype)
  last = lax.axis_index(axis) == n - 1
  return o.astype(v.dtype), lax.psum(jnp.where(last, S_after, 0.0), axis)


def sequence_parallel_gated_delta_rule(q, k, v, g, beta, *, mesh: Mesh, seq_axis: str = "seq",
                                       batch_axis: str | None = None,
                                       head_axis: str | None = None, scale: float | None = None,
                                       initial_state=None, output_final_state: bool = False,
                                       use_qk_l2norm: bool = False,
                                       qk_norm_eps: float | None = None, segment_ids=None,
                                       chunk_size: int = 64, impl: str = "chunked"):
  """`gated_delta_rule` with time split over the mesh axis `seq_axis` (math: module docstring).

  Same arguments and results as `gdn_jax.ops.gated_delta_rule`, plus:
    mesh: the device mesh; `seq_axis` (size n) must divide T: device j holds tokens
      [j·T/n, (j+1)·T/n).
    batch_axis, head_axis: optional mesh axes that also split the batch (B) and the heads (H and
      Hk, which must both divide by the axis size: value head h reads q/k head h // (H/Hk)).
    qk_norm_eps: None for the rule's default.
    impl: the rule's implementation in each shard ("chunked"; tested on CPU only). Inside
      `shard_map` each call sees only its own device's arrays.

  Returns (o [B, T, H, V] sharded like v, final state [B, H, K, V] or None). Call it under
  `jax.jit`; differentiable in q, k, v, g, β and the initial state.
  """
  if seq_axis not in mesh.shape:
    raise ValueError(f"sequence_parallel: `seq_axis`={seq_axis!r} is not an axis of the mesh "
                     f"{dict(mesh.shape)}; expected one of {tuple(mesh.shape)}.")
  n = mesh.shape[seq_axis]
  B, T, Hk, K = q.shape
  H = v.shape[2]
  if T % n:
    raise ValueError(f"sequence_parallel: T={T} tokens do not split over the {n} devices of "
                     f"mesh axis {seq_axis!r}; expected T % {n} == 0.")
  for name, axis, sizes in (("batch_axis", batch_axis, {"B": B}),
                            ("head_axis", head_axis, {"H": H, "Hk": Hk})):
    if axis is None:
      continue
    if axis not in mesh.shape or axis == seq_axis:
      raise ValueError(f"sequence_parallel: `{name}`={axis!r}; expected a mesh axis other than "
                       f"{seq_axis!r} among {tuple(mesh.shape)}, or None.")
    for dim, size in sizes.items():
      if size % mesh.shape[axis]:
        raise ValueError(f"sequence_parallel: {dim}={size} does not split over the "
                         f"{mesh.shape[axis]} devices of `{name}`={axis!r}; expected "
                         f"{dim} % {mesh.shape[axis]} == 0.")
  if initial_state is None:
    initial_state = jnp.zeros((B, H, K, v.shape[3]), jnp.float32)
  rule_kw = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, impl=impl)
  if qk_norm_eps is not None:  # None: the rule's default
    rule_kw["qk_norm_eps"] = qk_norm_eps
  tokens = P(batch_axis, seq_axis, head_axis, None)
  gates = P(batch_axis, seq_axis, head_axis)
  state = P(batch_axis, head_axis, None, None)
  in_specs = [tokens,            # q
              tokens,            # k
              tokens,            # v
              gates,             # g
              gates,             # beta
              state,             # initial_state
              P(batch_axis, seq_axis) if segment_ids is not None else None]  # segment_ids
  out_specs = (tokens, state) if output_final_state else tokens
  body = functools.partial(_shard, axis=seq_axis, n=n, rule_kw=rule_kw, final=output_final_state)
  args = [_place(x, mesh, spec) for x, spec in zip(
      (q, k, v, g, beta, initial_state, segment_ids), in_specs)]
  out = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs)(*args)
  return out if output_final_state else (out, None)
