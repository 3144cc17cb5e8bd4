"""The Pallas kernels under a device mesh (`gdn_jax.ops.sharded`): one call per device inside
`jax.shard_map`, batch and heads split, the sequence local.

* on 8 CPU devices, kernels in interpret mode: outputs, final states and the gradients w.r.t.
  q, k, v, g, β and h0 equal the single-device run (data 2 × model 2 × a third axis that only
  copies; forward also on a mesh of Explicit axes), and a small model's loss and gradients under
  the trainer's mesh (data 4 × model 2, parameters sharded by `gdn_jax.sharding`, the step traced
  under it by `sharding.under_mesh`) with rule_impl="pallas" equal the single-device run;
* on an abstract mesh (no devices needed): the specs of the `shard_map`, no wrapper without a
  mesh, what impl="auto" resolves to, and the errors for shapes that do not split.

The 8-device runs share one subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax starts.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from gdn_jax.ops import gated_delta_rule
from gdn_jax.ops.gated_delta_rule import _resolve_impl
from tests.train_test import REPO

_SCRIPT = r"""
import json, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from flax import nnx
from gdn_jax import sharding
from gdn_jax.ops import gated_delta_rule
from gdn_jax.train import config as config_lib
from gdn_jax.train.step import make_loss_fn
from tests.train_test import make_token_files, tiny_config
assert len(jax.devices()) == 8, jax.devices()
rel = lambda x, ref: float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))
out = {}

# The rule: grouped value heads (Hk 2, H 4), an initial state, packed documents (a start inside
# a chunk, one on a chunk boundary, two in one row), T = 40 not a multiple of C = 16.
B, T, Hk, H, K, V = 4, 40, 2, 4, 16, 16
ks = jax.random.split(jax.random.key(0), 8)
args = (jax.random.normal(ks[0], (B, T, Hk, K)), jax.random.normal(ks[1], (B, T, Hk, K)),
        jax.random.normal(ks[2], (B, T, H, V)),
        -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)) - 1.0),
        jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H))),
        jax.random.normal(ks[5], (B, H, K, V)))
seg = np.zeros((B, T), np.int32)
seg[0, 10:] = 1; seg[1, 16:] = 1; seg[3, 5:] = 1; seg[3, 33:] = 2
do, dS = jax.random.normal(ks[6], (B, T, H, V)), jax.random.normal(ks[7], (B, H, K, V))

def loss(q, k, v, g, beta, h0):
  o, S = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                          use_qk_l2norm=True, segment_ids=seg, chunk_size=16, impl="pallas")
  return jnp.sum(o * do) + jnp.sum(S * dS), (o, S)

step = jax.value_and_grad(loss, argnums=range(6), has_aux=True)
names = ("o", "S", "dq", "dk", "dv", "dg", "dbeta", "dh0")
flat = lambda r: dict(zip(names, (*r[0][1], *r[1])))
single = flat(jax.jit(step)(*args))
mesh = jax.make_mesh((2, 2, 2), ("data", "model", "copies"), axis_types=(AxisType.Auto,) * 3)
with jax.set_mesh(mesh):
  sharded = flat(jax.jit(step)(*args))
out["rule"] = {n: rel(sharded[n], single[n]) for n in names}
out["rule"]["o_spec"] = str(sharded["o"].sharding.spec)
# jax.make_mesh's axes are Explicit: the inputs are resharded onto the specs first (forward only).
with jax.set_mesh(jax.make_mesh((4, 2), ("data", "model"))):
  (_, (o, S)) = jax.jit(loss)(*args)
out["rule"]["o_explicit"], out["rule"]["S_explicit"] = rel(o, single["o"]), rel(S, single["S"])

# A small model under the trainer's mesh: parameters and batch sharded as gdn_jax.train does.
c = tiny_config(make_token_files(tempfile.mkdtemp(), num_bytes=4_000))
c.model.update(rule_impl="pallas")
graphdef, params = nnx.split(config_lib.build_model(c))
tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, c.model.vocab_size)
grad_fn = jax.value_and_grad(make_loss_fn(graphdef))
loss1, grads1 = jax.jit(grad_fn)(params, tokens)
mesh = sharding.make_mesh(data=4, model=2)
param_sh = sharding.tree_shardings(params, mesh)
step = jax.jit(sharding.under_mesh(grad_fn, mesh),
               in_shardings=(param_sh, sharding.batch_sharding(mesh)))
jaxpr = str(step.trace(params, tokens).jaxpr)
loss8, grads8 = step(jax.device_put(params, param_sh), tokens)
g1, g8 = jax.tree.leaves(grads1), jax.tree.leaves(grads8)
out["model"] = {"loss": rel(loss8, loss1), "grads": max(rel(a, b) for a, b in zip(g8, g1)),
                "num_grads": len(g1), "shard_maps": jaxpr.count("shard_map"),
                "q_proj_spec": str(param_sh["blocks"][0]["mixer"]["q_proj"]["kernel"].spec)}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         # Interpret-mode kernels make large programs: XLA's optimisations would take most of the
         # time (38 s instead of 85 on 2 busy cores), and the results need no speed.
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split("RESULT")[1])


def test_rule_matches_single_device(eight_devices):
  err = eight_devices["rule"]
  print(err)
  # Each device runs the same kernels on its rows and heads: only float32 rounding may differ
  # (other block sizes for the smaller local B·H; measured ≤ 4e-7 of each quantity's largest
  # entry). A wrong spec or a lost cotangent gives errors of order 1.
  for name, value in err.items():
    if name != "o_spec":
      assert value < 1e-5, (name, value)
  assert err["o_spec"] == str(P("data", None, "model"))  # o stays split: no gather after


def test_model_matches_single_device(eight_devices):
  res = eight_devices["model"]
  print(res)
  assert res["q_proj_spec"] == str(P("data", "model"))    # the trainer's FSDP + head split
  assert res["shard_maps"] >= 2        # the forward's kernels and the backward's are mapped
  # Sharded matmuls sum in another order (FSDP gathers, row-split o_proj): measured 3e-7 (loss)
  # and 2e-6 (largest gradient error over the largest entry, per parameter).
  assert res["loss"] < 2e-6, res
  assert res["grads"] < 2e-5, res


def _inputs(B, T, Hk, H, K, V):
  return (jax.ShapeDtypeStruct((B, T, Hk, K), jnp.float32),
          jax.ShapeDtypeStruct((B, T, Hk, K), jnp.float32),
          jax.ShapeDtypeStruct((B, T, H, V), jnp.float32),
          jax.ShapeDtypeStruct((B, T, H), jnp.float32),
          jax.ShapeDtypeStruct((B, T, H), jnp.float32))


def _mesh(**axes):
  return AbstractMesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def _jaxpr(mesh, shapes, **kw):
  def rule(*xs):
    return gated_delta_rule(*xs, output_final_state=True, impl="pallas", chunk_size=16, **kw)
  if mesh is None:
    return jax.make_jaxpr(rule)(*shapes)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.make_jaxpr(rule)(*shapes)


def test_shard_map_specs_split_batch_and_heads():
  seg = jax.ShapeDtypeStruct((4, 32), jnp.int32)
  mesh = _mesh(data=2, model=2, copies=2)
  with jax.sharding.use_abstract_mesh(mesh):
    jaxpr = jax.make_jaxpr(lambda s, *xs: gated_delta_rule(
        *xs, segment_ids=s, output_final_state=True, impl="pallas", chunk_size=16))(
            seg, *_inputs(4, 32, 2, 4, 16, 16))
  maps = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
  assert len(maps) == 1
  assert not [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]  # none outside
  assert "pallas_call" in str(maps[0].params["jaxpr"])
  tokens, gates, state = P("data", None, "model", None), P("data", None, "model"), P(
      "data", "model", None, None)
  assert maps[0].params["in_specs"] == (tokens,           # q
                                        tokens,           # k
                                        tokens,           # v
                                        gates,            # g
                                        gates,            # beta
                                        state,            # h0
                                        P("data", None))  # reset
  assert maps[0].params["out_specs"] == (tokens, state)   # o, final state
  # The third axis only copies: every axis is manual inside, so no call is left to XLA.
  assert set(maps[0].params["newly_manual_axes"]) == {"data", "model", "copies"}


def test_no_shard_map_without_a_mesh():
  for mesh in (None, _mesh(data=1, model=1)):
    jaxpr = _jaxpr(mesh, _inputs(2, 32, 2, 2, 16, 16))
    names = {e.primitive.name for e in jaxpr.eqns}
    assert "shard_map" not in names, mesh


@pytest.mark.parametrize("backend, shapes, axes, expected", [
    ("gpu", (8, 4, 4), dict(data=4, model=2), "pallas"),     # splits: one call per device
    ("gpu", (8, 3, 3), dict(data=4, model=2), "chunked"),    # heads do not split over model 2
    ("gpu", (6, 4, 4), dict(data=4, model=2), "chunked"),    # batch does not split over data 4
    ("gpu", (8, 4, 4), dict(data=1, model=1), "pallas"),     # a one-device mesh
    ("gpu", (8, 4, 4), None, "pallas"),                      # no mesh, one device (this process)
    ("cpu", (8, 4, 4), dict(data=4, model=2), "chunked"),    # CPU: chunked, as on one device
])
def test_auto_keeps_pallas_under_a_mesh(backend, shapes, axes, expected):
  B, Hk, H = shapes
  resolve = lambda: _resolve_impl("auto", backend, B, Hk, H, 128, 128)
  if axes is None:
    assert jax.device_count() == 1
    assert resolve() == expected
    return
  with jax.sharding.use_abstract_mesh(_mesh(**axes)):
    assert resolve() == expected


def test_shapes_that_do_not_split_name_the_argument_and_the_fix():
  mesh = _mesh(data=4, model=2)
  with pytest.raises(ValueError, match=r"batch B=6 \(axis 0 of `q`.*4 devices of mesh axes "
                     r"\('data',\); expected B % 4 == 0\. Use a batch size divisible by 4, or "
                     r"impl='chunked'"):
    _jaxpr(mesh, _inputs(6, 32, 2, 2, 16, 16))
  with pytest.raises(ValueError, match=r"heads H=6 \(axis 2 of `v`.*Hk=3 \(axis 2 of `q`, `k`\) "
                     r"do not both split over the 2 devices of mesh axis 'model'.*Hk % 2 == 0"):
    _jaxpr(mesh, _inputs(4, 32, 3, 6, 16, 16))
