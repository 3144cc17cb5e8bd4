"""The Pallas kernels under a device mesh: one kernel call per device, inside `jax.shard_map`.

A `pallas_call` has no SPMD partitioning rule: under `jit` over a sharded program XLA cannot
split it and would gather its inputs onto every device. The rule is independent across batch
rows and value heads, so each device can run the kernels on its own rows and heads, with the
whole sequence local:

    q, k [B, T, Hk, K], v [B, T, H, V]  → P(batch, None, heads, None)
    g, β [B, T, H]                      → P(batch, None, heads)
    h0, final state [B, H, K, V]        → P(batch, heads, None, None)
    reset [B, T] (packed documents)     → P(batch, None)

batch = the mesh's data-parallel axes (`gdn_jax.sharding.ACTIVATION_BATCH_AXES`), heads = its
head axis (`ACTIVATION_HEAD_AXIS`): the layout the trainer's column-split projections produce.
Splitting H and Hk by the same factor keeps grouped value heads local (value head h reads q/k
head h // (H/Hk), and device j holds heads [j·H/n, (j+1)·H/n) and [j·Hk/n, (j+1)·Hk/n)).
Any other mesh axis gets whole copies (each of its devices runs the same call).

The mesh is the active one: `jax.set_mesh(mesh)` around the jitted call, or the step traced
under `gdn_jax.sharding.under_mesh(step, mesh)`. Axes already Manual (inside an enclosing
`shard_map`, whose body sees one device's arrays) are left alone; with no active mesh, or no axis
of size > 1 left, the kernels are called as they are. An enclosing `shard_map` needs
`check_vma=False` for them (see below); `gdn_jax.sequence_parallel` has it on and keeps "chunked".

Gradients: `shard_map` is differentiable and the kernels keep their own `custom_vjp` inside it.
`check_vma=False` because `pallas_call` does not declare how its outputs vary over mesh axes;
with it off, jax's transpose sums the cotangents of inputs copied over an axis (psum), so
gradients stay right for every spec above.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from gdn_jax.sharding import ACTIVATION_BATCH_AXES, ACTIVATION_HEAD_AXIS


def mapped_mesh() -> AbstractMesh | None:
  """The active mesh if it has axes to map a kernel over (not Manual, size > 1), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape[a] == 1 for a in _free_axes(mesh)):
    return None
  return mesh


def _free_axes(mesh: AbstractMesh) -> tuple[str, ...]:
  return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind != AxisType.Manual)


def _split_axes(mesh: AbstractMesh):
  """(batch axes, head axis or None) of `mesh` that carry more than one device."""
  free = [a for a in _free_axes(mesh) if mesh.shape[a] > 1]
  batch = tuple(a for a in ACTIVATION_BATCH_AXES if a in free)
  head = ACTIVATION_HEAD_AXIS if ACTIVATION_HEAD_AXIS in free else None
  return batch, head


def split_error(mesh: AbstractMesh, B: int, Hk: int, H: int) -> str | None:
  """Why one kernel call per device does not fit these shapes on `mesh`; None when it does."""
  batch, head = _split_axes(mesh)
  n_batch = math.prod(mesh.shape[a] for a in batch)
  if B % n_batch:
    return (f"batch B={B} (axis 0 of `q`, `k`, `v`, `g`, `beta`) does not split over the {n_batch} "
            f"devices of mesh axes {batch}; expected B % {n_batch} == 0. Use a batch size "
            f"divisible by {n_batch}, or impl='chunked' (XLA partitions it)")
  if head is not None and (H % mesh.shape[head] or Hk % mesh.shape[head]):
    n = mesh.shape[head]
    return (f"heads H={H} (axis 2 of `v`, `g`, `beta`) and Hk={Hk} (axis 2 of `q`, `k`) do not "
            f"both split over the {n} devices of mesh axis {head!r}; expected H % {n} == 0 and "
            f"Hk % {n} == 0. Use a mesh whose {head!r} axis divides both (e.g. "
            f"{head}=1), or impl='chunked' (XLA partitions it)")
  return None


def _place(x, mesh: AbstractMesh, spec: P):
  """x laid out on `spec` over the mesh's Explicit axes, which `shard_map` does not reshard by
  itself (Auto axes it does)."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  explicit = P(*(a if a is not None and types[a] == AxisType.Explicit else None for a in spec))
  if all(a is None for a in explicit):
    return x
  return jax.reshard(x, explicit)


def per_device(kernel: Callable, q, k, v, g, beta, h0, reset):
  """kernel(q, k, v, g, beta, h0, reset) → (o, final state), run once per device of the active
  mesh on its batch rows and heads (module docstring); called as is without such a mesh.

  Raises ValueError (naming the argument and the fix) when the shapes do not split.
  """
  mesh = mapped_mesh()
  if mesh is None:
    return kernel(q, k, v, g, beta, h0, reset)
  B, _, Hk, _ = q.shape
  H = v.shape[2]
  why = split_error(mesh, B, Hk, H)
  if why is not None:
    raise ValueError(f"gated_delta_rule: impl='pallas' under the mesh {dict(mesh.shape)}: {why}.")
  batch, head = _split_axes(mesh)
  b = batch or None
  tokens = P(b, None, head, None)
  gates = P(b, None, head)
  state = P(b, head, None, None)
  args = {"q": (q, tokens), "k": (k, tokens), "v": (v, tokens), "g": (g, gates),
          "beta": (beta, gates), "h0": (h0, state)}
  if reset is not None:  # [B, T] bool, one flag per token: rows split, no heads
    args["reset"] = (reset, P(b, None))
  names = tuple(args)

  def body(*local):
    kw = dict(zip(names, local))
    return kernel(kw["q"], kw["k"], kw["v"], kw["g"], kw["beta"], kw["h0"], kw.get("reset"))

  mapped = jax.shard_map(body, mesh=mesh, axis_names=set(_free_axes(mesh)),
                         in_specs=tuple(spec for _, spec in args.values()),
                         out_specs=(tokens,   # o [B, T, H, V]
                                    state),   # final state [B, H, K, V]
                         check_vma=False)
  return mapped(*(_place(x, mesh, spec) for x, spec in args.values()))
