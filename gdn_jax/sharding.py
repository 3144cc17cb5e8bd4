"""Device mesh and shardings: data parallel + FSDP on a `data` axis, heads on an optional `model` axis.

    mesh = Mesh(devices.reshape(data, model), ("data", "model"))
    batch [B, T+1]          → P("data", None)                 (B split over data-parallel replicas)
    parameter / Adam moment → the head (or MLP hidden) axis on "model" (Megatron column / row split:
                              q,k,v,g,a,b projections and gate/up split their output axis, o_proj and
                              down_proj their input axis, convs and per-head gains their channel axis),
                              then the largest remaining axis divisible by |data| on "data" (FSDP:
                              each replica stores 1/|data| of every large tensor; XLA all-gathers it
                              for the matmul and reduce-scatters the gradient).
A tensor whose axes do not divide is replicated on that mesh axis, so the same code runs on 1 or N
devices. Optimizer-state leaves get the rule of the parameter whose path they end with.

Multi-host: call `jax.distributed.initialize()` before anything else (see docs/training.md); the
mesh then spans `jax.devices()` of all hosts, each process loads `1/process_count` of every batch
and `jax.make_array_from_process_local_data` assembles the global batch.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
# Activations [B, T, H, ·] inside a mixer: batch rows on the data-parallel axes, heads on MODEL (the
# layout the column-split projections produce). `gdn_jax.ops.sharded` runs the Pallas kernels once
# per device over these axes.
ACTIVATION_BATCH_AXES, ACTIVATION_HEAD_AXIS = (DATA,), MODEL
# Parameter-name → axis carrying heads / hidden units (negative = from the end).
_MODEL_AXIS = {
    "q_proj": -1, "k_proj": -1, "v_proj": -1, "g_proj": -1, "a_proj": -1, "b_proj": -1,
    "gate_proj": -1, "up_proj": -1, "q_conv": -1, "k_conv": -1, "v_conv": -1,
    "A_log": 0, "dt_bias": 0, "o_proj": 0, "down_proj": 0,
}


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all); data=-1 takes the devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if not isinstance(model, int) or model < 1 or n % model:
    raise ValueError(f"mesh: `model`={model!r}; expected a positive divisor of the {n} devices.")
  if data == -1:
    data = n // model
  if not isinstance(data, int) or data < 1 or data * model != n:
    raise ValueError(f"mesh: `data`={data!r} × `model`={model} ≠ {n} devices; expected "
                     "data · model == number of devices (or data=-1).")
  return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def _path_names(keypath) -> list[str]:
  names = []
  for k in keypath:
    if getattr(k, "name", None) == "value":  # nnx.Variable's payload
      continue
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return names


def partition_spec(keypath, shape, mesh: Mesh) -> P:
  """The PartitionSpec of one parameter (or optimizer-state leaf) of `shape` at `keypath`."""
  spec = [None] * len(shape)
  n_model, n_data = mesh.shape[MODEL], mesh.shape[DATA]
  names = _path_names(keypath)
  for name in reversed(names):  # the innermost module name decides (…/q_proj/kernel)
    if name in _MODEL_AXIS and shape:
      axis = _MODEL_AXIS[name] % len(shape)
      if n_model > 1 and shape[axis] % n_model == 0:
        spec[axis] = MODEL
      break
  if n_data > 1:
    free = [a for a in range(len(shape)) if spec[a] is None and shape[a] % n_data == 0]
    if free:
      spec[max(free, key=lambda a: shape[a])] = DATA
  return P(*spec)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for every array leaf of `tree` (params or optimizer state), by path + shape."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, partition_spec(kp, np.shape(x), mesh)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process' rows → the global [B, T+1] array sharded over `data`."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def under_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` active (`jax.sharding.use_abstract_mesh`), for `jax.jit(...,
  in_shardings=...)` over that mesh: `gated_delta_rule` then runs its Pallas kernels once per
  device inside `shard_map` (`gdn_jax.ops.sharded`), which XLA cannot do for them, and
  impl="auto" keeps them. Shardings still come from jit's in/out_shardings."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced
