"""Sequence parallelism: the rule with time split over 2–8 CPU devices equals the single-device
rule (outputs, final state, gradients), with grouped value heads, an initial state and packed
documents whose boundaries fall inside shards and on shard boundaries.

The sharded runs need 8 devices: they run in one subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from gdn_jax.sequence_parallel import sequence_parallel_gated_delta_rule
from tests.train_test import REPO

# name: (B, T, Hk, H, K, V, mesh {axis: size}, initial state, document starts or None)
CASES = {
    "T192_4shards_gva": (2, 192, 1, 2, 16, 8, {"seq": 4}, False, None),
    # Shards of 15 tokens: not a multiple of the chunk (16), the rule pads each shard.
    "T120_8shards_gva_h0": (1, 120, 1, 3, 16, 16, {"seq": 8}, True, None),
    # Row 0: starts inside shards (20, 50) and on shard boundaries (32, 64); shard 3 (48–63)
    # holds one start, shards 4–7 one document. Row 1: one document.
    "T128_8shards_segments": (2, 128, 2, 4, 16, 8, {"seq": 8}, True, [[20, 32, 50, 64], []]),
    # seq × batch × heads. Row 0's second document crosses the shard boundary; row 1's starts on
    # it and row 1 has another start inside shard 1.
    "T64_2shards_x_batch_x_heads": (2, 64, 2, 4, 16, 16, {"seq": 2, "data": 2, "model": 2},
                                    True, [[10], [32, 40]]),
}
# Also run forward on a mesh of Explicit axes.
EXPLICIT_MESH_CASE = "T192_4shards_gva"

_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from gdn_jax.ops import gated_delta_rule
from gdn_jax.sequence_parallel import sequence_parallel_gated_delta_rule
assert len(jax.devices()) == 8, jax.devices()
cases = json.loads(sys.argv[1])
out = {}
for name, (B, T, Hk, H, K, V, axes, with_h0, starts) in cases.items():
  ks = jax.random.split(jax.random.key(len(out)), 8)
  q, k = jax.random.normal(ks[0], (B, T, Hk, K)), jax.random.normal(ks[1], (B, T, Hk, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  # Weak decays and writes (e^g ≈ 0.99, β ≈ 0.1): a shard's transition P keeps norm 0.6–0.9,
  # so states carried over several shards matter (strong decays would hide a broken scan).
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)) - 5.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)) - 2.0)
  h0 = jax.random.normal(ks[5], (B, H, K, V)) if with_h0 else None
  seg = None
  if starts is not None:
    seg = np.zeros((B, T), np.int32)
    for b, row in enumerate(starts):
      for t in row:
        seg[b, t:] += 1
    seg = jnp.asarray(seg)
  do = jax.random.normal(ks[6], (B, T, H, V))          # random cotangents of o and S_T
  dS = jax.random.normal(ks[7], (B, H, K, V))
  kw = dict(use_qk_l2norm=True, chunk_size=16, output_final_state=True, segment_ids=seg)
  mesh = Mesh(np.asarray(jax.devices()[:int(np.prod(list(axes.values())))]).reshape(
      *axes.values()), tuple(axes))
  sharded = lambda *a, **kw2: sequence_parallel_gated_delta_rule(
      *a, mesh=mesh, batch_axis="data" if "data" in axes else None,
      head_axis="model" if "model" in axes else None, **kw, **kw2)
  single = lambda *a, **kw2: gated_delta_rule(*a, impl="chunked", **kw, **kw2)
  results = {}
  for label, rule in (("sharded", sharded), ("single", single)):
    def loss(q, k, v, g, beta, h0):
      o, S = rule(q, k, v, g, beta, initial_state=h0)
      return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)
    argnums = (0, 1, 2, 3, 4, 5) if with_h0 else (0, 1, 2, 3, 4)
    (_, (o, S)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
        q, k, v, g, beta, h0)
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    results[label] = dict(o=o, S=S, **dict(zip(names, grads)))
  # max |sharded − single| / max |single|, per quantity
  out[name] = {key: float(jnp.max(jnp.abs(results["sharded"][key] - ref)) / jnp.max(jnp.abs(ref)))
               for key, ref in results["single"].items()}
  out[name]["o_sharding"] = str(results["sharded"]["o"].sharding.spec)
  if name == sys.argv[2]:  # jax.make_mesh's axes are Explicit: inputs are resharded first
    explicit = jax.make_mesh(tuple(axes.values()), tuple(axes),
                             axis_types=(jax.sharding.AxisType.Explicit,) * len(axes))
    o, _ = jax.jit(lambda *a: sequence_parallel_gated_delta_rule(
        *a[:5], initial_state=a[5], mesh=explicit, **kw))(q, k, v, g, beta, h0)
    ref = results["single"]["o"]
    out[name]["o_explicit_mesh"] = float(jnp.max(jnp.abs(o - ref)) / jnp.max(jnp.abs(ref)))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         # Compiling the 9 sharded and single-device programs is most of the time; XLA's
         # optimisations would add ~40% and these small programs need no speed (the errors stay
         # float32 rounding: ≤ 6e-7, as optimised).
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES), EXPLICIT_MESH_CASE],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split("RESULT")[1])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_device(errors, name):
  err = errors[name]
  print(name, {k: f"{v:.1e}" for k, v in err.items() if k != "o_sharding"})
  # float32 rounding only: the sharded run adds S_inᵀ r_t to outputs computed from a zero state
  # and composes per-shard maps where the single run walks one state (the same sums in another
  # order). Measured ≤ 6e-7 of each quantity's largest entry; 5e-6 is ~40 float32 ulps, while a
  # wrong hand-off or reset gives errors of order 1.
  for key, value in err.items():
    if key != "o_sharding":
      assert value < 5e-6, (key, value)
  assert "'seq'" in err["o_sharding"]  # the output stays split along time


def test_rejects_bad_layouts():
  q = k = jax.ShapeDtypeStruct((2, 100, 2, 16), np.float32)
  v = jax.ShapeDtypeStruct((2, 100, 4, 16), np.float32)
  g = beta = jax.ShapeDtypeStruct((2, 100, 4), np.float32)
  call = lambda mesh, **kw: sequence_parallel_gated_delta_rule(q, k, v, g, beta, mesh=mesh, **kw)
  with pytest.raises(ValueError, match=r"T=100 tokens do not split over the 8 devices"):
    call(AbstractMesh((8,), ("seq",)))
  with pytest.raises(ValueError, match=r"`seq_axis`='time' is not an axis"):
    call(AbstractMesh((4,), ("seq",)), seq_axis="time")
  with pytest.raises(ValueError, match=r"H=4 does not split over the 3 devices of `head_axis`"):
    call(AbstractMesh((4, 3), ("seq", "model")), head_axis="model")
  with pytest.raises(ValueError, match=r"`batch_axis`='seq'; expected a mesh axis other than"):
    call(AbstractMesh((4,), ("seq",)), batch_axis="seq")
