"""gated_delta_rule: recurrent and chunked against an independent float64 NumPy reference.

Tolerances (relative, ‖x − ref‖ / ‖ref‖):
  * float32 inputs: 1e-5 for outputs, final states and gradients (the issue's bar);
  * bfloat16 inputs: 2e-2 for outputs (bf16 output rounding alone is ~4e-3), 1e-5 for the fp32
    final state of the (exactly representable) bf16-rounded inputs.
"""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.ops import default_impl, gated_delta_rule
from tests.np_reference import gated_delta_rule_ref

IMPLS = ("recurrent", "chunked")


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def make_inputs(seed, B, T, Hk, H, K, V, *, decay=(0.0, 1.0), with_h0=True, segments=False):
  """Random inputs; k is L2-normalised (the layer always normalises), g ∈ −U(decay)."""
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, T, Hk, K))
  k = r.normal(size=(B, T, Hk, K))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = r.normal(size=(B, T, H, V))
  g = -r.uniform(*decay, size=(B, T, H))
  beta = r.uniform(0.05, 1.0, size=(B, T, H))
  h0 = r.normal(size=(B, H, K, V)) if with_h0 else None
  seg = np.cumsum(r.uniform(size=(B, T)) < 0.08, axis=1).astype(np.int32) if segments else None
  return dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0, seg=seg)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "use_qk_l2norm"))
def run(q, k, v, g, beta, h0, seg, *, impl, chunk_size=64, use_qk_l2norm=False):
  return gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                          segment_ids=seg, impl=impl, chunk_size=chunk_size,
                          use_qk_l2norm=use_qk_l2norm)


def to_jax(x, dtype=jnp.float32):
  return None if x is None else jnp.asarray(x, dtype)


SHAPES = [  # (B, T, Hk, H, K, V, chunk)
    (2, 1, 2, 2, 16, 32, 64),
    (1, 63, 1, 1, 32, 16, 64),
    (2, 64, 2, 4, 16, 24, 64),      # grouped value heads (GVA), K ≠ V
    (1, 65, 1, 2, 32, 32, 64),
    (1, 300, 2, 2, 16, 16, 32),
    (1, 77, 1, 1, 8, 8, 16),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}Hk{}H{}K{}V{}C{}".format(*s))
@pytest.mark.parametrize("with_h0,segments", [(True, False), (False, True)])
def test_matches_float64_reference(impl, shape, with_h0, segments):
  B, T, Hk, H, K, V, C = shape
  x = make_inputs(hash(shape) % 1000, B, T, Hk, H, K, V, with_h0=with_h0, segments=segments)
  o, S = run(*(to_jax(x[n]) for n in ("q", "k", "v", "g", "beta", "h0")), to_jax(x["seg"], jnp.int32),
             impl=impl, chunk_size=C)
  o_ref, S_ref = gated_delta_rule_ref(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                      initial_state=x["h0"], segment_ids=x["seg"])
  assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
  assert S.shape == (B, H, K, V) and S.dtype == jnp.float32
  assert rel_err(o, o_ref) < 1e-5
  assert rel_err(S, S_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("qk_norm_eps", [None, 0.5])
def test_l2norm_and_scale(impl, qk_norm_eps):
  x = make_inputs(1, 2, 40, 2, 2, 16, 8)
  q, k = x["q"] * 3.0, x["k"] * 0.2           # not unit norm: the option must normalise
  eps = {} if qk_norm_eps is None else {"qk_norm_eps": qk_norm_eps}  # 0.5: |k|² ≈ eps, shortened
  o, _ = gated_delta_rule(*(to_jax(a) for a in (q, k, x["v"], x["g"], x["beta"])),
                          scale=0.37, use_qk_l2norm=True, impl=impl, chunk_size=16, **eps)
  o_ref, _ = gated_delta_rule_ref(q, k, x["v"], x["g"], x["beta"], scale=0.37, use_qk_l2norm=True,
                                  **eps)
  assert rel_err(o, o_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("decay", [(0.0, 0.0), (19.0, 21.0)], ids=["no-decay", "strong-decay"])
def test_decay_extremes(impl, decay):
  """g = 0 (pure delta rule) and g ≈ −20 (the state forgets at once): finite and exact."""
  x = make_inputs(2, 1, 130, 1, 2, 16, 16, decay=decay)
  o, S = run(*(to_jax(x[n]) for n in ("q", "k", "v", "g", "beta", "h0")), None, impl=impl)
  o_ref, S_ref = gated_delta_rule_ref(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                      initial_state=x["h0"])
  assert np.all(np.isfinite(o)) and np.all(np.isfinite(S))
  assert rel_err(o, o_ref) < 1e-5
  assert rel_err(S, S_ref) < 1e-5 or np.abs(S - S_ref).max() < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
  x = make_inputs(3, 2, 100, 2, 4, 32, 32)
  xb = {n: to_jax(x[n], jnp.bfloat16) for n in ("q", "k", "v")}
  o, S = run(xb["q"], xb["k"], xb["v"], to_jax(x["g"]), to_jax(x["beta"]), to_jax(x["h0"]), None,
             impl=impl)
  assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
  # Reference on the same bf16-rounded values, in float64.
  rounded = {n: np.asarray(xb[n].astype(jnp.float32)) for n in xb}
  o_ref, S_ref = gated_delta_rule_ref(rounded["q"], rounded["k"], rounded["v"], x["g"], x["beta"],
                                      initial_state=x["h0"])
  assert rel_err(o, o_ref) < 2e-2
  assert rel_err(S, S_ref) < 1e-5


def test_segments_equal_separate_documents():
  """Packed documents == each document run on its own; the initial state feeds only the first."""
  r = np.random.default_rng(4)
  lengths = [7, 40, 1, 29]
  x = make_inputs(5, 1, sum(lengths), 1, 2, 16, 16)
  seg = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32)
  for impl in IMPLS:
    o, S = run(*(to_jax(x[n]) for n in ("q", "k", "v", "g", "beta", "h0")), to_jax(seg, jnp.int32),
               impl=impl, chunk_size=16)
    start = 0
    for i, n in enumerate(lengths):
      part = {name: to_jax(x[name][:, start:start + n]) for name in ("q", "k", "v", "g", "beta")}
      h0 = to_jax(x["h0"]) if i == 0 else None
      o_doc, S_doc = run(part["q"], part["k"], part["v"], part["g"], part["beta"], h0, None,
                         impl=impl, chunk_size=16)
      assert rel_err(o[:, start:start + n], o_doc) < 1e-5, (impl, i)
      start += n
    assert rel_err(S, S_doc) < 1e-5
  del r


# --- gradients -------------------------------------------------------------------------------

GRAD_ARGS = ("q", "k", "v", "g", "beta", "h0")


def _loss_jax(impl, chunk_size, seg, R_o, R_S, q, k, v, g, beta, h0):
  o, S = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                          segment_ids=seg, impl=impl, chunk_size=chunk_size)
  return jnp.sum(o * R_o) + jnp.sum(S * R_S)


def _loss_ref(seg, R_o, R_S, q, k, v, g, beta, h0):
  o, S = gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0, segment_ids=seg)
  return np.sum(o * R_o) + np.sum(S * R_S)


def _grads(impl, x, R_o, R_S, chunk_size):
  seg = to_jax(x["seg"], jnp.int32)
  f = jax.jit(jax.grad(functools.partial(_loss_jax, impl, chunk_size, seg),
                       argnums=tuple(range(2, 8))))
  return dict(zip(GRAD_ARGS, f(to_jax(R_o), to_jax(R_S), *(to_jax(x[n]) for n in GRAD_ARGS))))


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_gradients_against_float64_finite_differences(segments):
  """Directional derivatives of every input (h0 included) vs central differences in float64."""
  B, T, Hk, H, K, V = 1, 37, 1, 2, 8, 8
  x = make_inputs(6, B, T, Hk, H, K, V, segments=segments)
  r = np.random.default_rng(7)
  R_o, R_S = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
  grads = {impl: _grads(impl, x, R_o, R_S, 16) for impl in IMPLS}
  eps = 1e-6
  for name in GRAD_ARGS:
    direction = r.normal(size=x[name].shape)
    plus, minus = dict(x), dict(x)
    plus[name] = x[name] + eps * direction
    minus[name] = x[name] - eps * direction
    args = lambda d: [d[n] for n in GRAD_ARGS]
    fd = (_loss_ref(x["seg"], R_o, R_S, *args(plus))
          - _loss_ref(x["seg"], R_o, R_S, *args(minus))) / (2 * eps)
    for impl in IMPLS:
      ad = float(np.sum(np.asarray(grads[impl][name], np.float64) * direction))
      assert abs(ad - fd) <= 1e-4 * max(abs(fd), 1.0), (impl, name, ad, fd)


@pytest.mark.parametrize("shape", [(2, 130, 2, 4, 16, 32, 32), (1, 64, 1, 1, 32, 16, 64)])
def test_chunked_gradients_match_recurrent(shape):
  B, T, Hk, H, K, V, C = shape
  x = make_inputs(8, B, T, Hk, H, K, V, segments=True)
  r = np.random.default_rng(9)
  R_o, R_S = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
  g_rec, g_chk = _grads("recurrent", x, R_o, R_S, C), _grads("chunked", x, R_o, R_S, C)
  for name in GRAD_ARGS:
    assert np.all(np.isfinite(g_chk[name])), name
    assert rel_err(g_chk[name], g_rec[name]) < 1e-5, name


def test_strong_decay_gradients():
  """g ≈ −20: every gradient finite and equal to the recurrent one. dg is ~1e-9, 1e-8 times the
  other gradients: both fp32 implementations land ~8e-5 from the float64 truth there, so dg is
  held to 1e-4 between them and 1e-3 against float64 finite differences; the rest to 1e-5."""
  B, T, H, K, V = 1, 96, 1, 16, 16
  x = make_inputs(10, B, T, 1, H, K, V, decay=(19.0, 21.0))
  r = np.random.default_rng(11)
  R_o, R_S = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
  g_rec, g_chk = _grads("recurrent", x, R_o, R_S, 32), _grads("chunked", x, R_o, R_S, 32)
  for name in GRAD_ARGS:
    assert np.all(np.isfinite(g_chk[name])), name
    assert rel_err(g_chk[name], g_rec[name]) < (1e-4 if name == "g" else 1e-5), name
  direction = r.normal(size=x["g"].shape)
  eps = 1e-3   # the loss is smooth in g; the change it makes (~1e-11) is far above fp64 rounding
  loss = lambda g: _loss_ref(None, R_o, R_S, x["q"], x["k"], x["v"], g, x["beta"], x["h0"])
  fd = (loss(x["g"] + eps * direction) - loss(x["g"] - eps * direction)) / (2 * eps)
  for grads in (g_rec, g_chk):
    ad = float(np.sum(np.asarray(grads["g"], np.float64) * direction))
    assert abs(ad - fd) <= 1e-3 * abs(fd), (ad, fd)


def test_auto_resolves_and_matches():
  x = make_inputs(12, 1, 50, 1, 1, 8, 8)
  args = [to_jax(x[n]) for n in ("q", "k", "v", "g", "beta")]
  o_auto, _ = gated_delta_rule(*args, impl="auto", chunk_size=16)
  o_ref, _ = gated_delta_rule_ref(x["q"], x["k"], x["v"], x["g"], x["beta"])
  assert rel_err(o_auto, o_ref) < 1e-5


def test_default_impl_per_backend_and_head_dims():
  assert default_impl("cpu") == "chunked"
  assert default_impl("gpu") == "pallas"
  assert default_impl("gpu", K=128, V=256) == "pallas"
  assert default_impl("gpu", K=8, V=64) == "chunked"      # Triton dots need dims >= 16
  assert default_impl("gpu", K=128, V=96) == "chunked"    # ... and power-of-two blocks
  assert default_impl("gpu", num_devices=2) == "chunked"  # a custom call is not partitioned


def test_pallas_on_gpu_rejects_head_dims_it_cannot_compile(monkeypatch):
  x = make_inputs(14, 1, 20, 1, 1, 8, 16)
  args = [to_jax(x[n]) for n in ("q", "k", "v", "g", "beta")]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match=r"impl='pallas' on gpu: head dim K=8.*impl='chunked'"):
    gated_delta_rule(*args, impl="pallas", chunk_size=16)


def test_kernels_are_a_leaf_package_loaded_on_first_use():
  """Dependencies point one way: `kernels_pallas` imports nothing from `gdn_jax`; the op module
  imports only the shared chunk math eagerly (the XLA path's identities) and loads the kernels
  only when an implementation needs them (fresh processes: nothing preloaded)."""
  shared = ("kernels_pallas", "kernels_pallas.config", "kernels_pallas.chunk_math",
            "kernels_pallas.chunk_grads")
  checks = [
      "import sys, kernels_pallas, kernels_pallas.gpu, kernels_pallas.tpu\n"
      "assert not [m for m in sys.modules if m.startswith('gdn_jax')], 'a kernel imports gdn_jax'",
      "import sys, gdn_jax.ops\n"
      f"eager = [m for m in sys.modules if m.startswith('kernels_pallas') and m not in {shared}]\n"
      "assert not eager, f'gdn_jax.ops imports kernels eagerly: {eager}'\n"
      "assert 'jax.experimental.pallas' not in sys.modules, 'gdn_jax.ops imports Pallas'"]
  for code in checks:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"},
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert result.returncode == 0, result.stderr[-2000:]


def test_final_state_is_none_unless_asked():
  x = make_inputs(13, 1, 5, 1, 1, 8, 8)
  _, S = gated_delta_rule(*(to_jax(x[n]) for n in ("q", "k", "v", "g", "beta")))
  assert S is None


# --- errors -----------------------------------------------------------------------------------

def _good(B=2, T=10, Hk=2, H=4, K=8, V=16):
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(q=z(B, T, Hk, K), k=z(B, T, Hk, K), v=z(B, T, H, V), g=z(B, T, H), beta=z(B, T, H))


def _call(overrides=(), **kwargs):
  a = _good()
  a.update(dict(overrides))
  return gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], **kwargs)


@pytest.mark.parametrize("overrides,kwargs,pattern", [
    ({"q": jnp.zeros((2, 10, 8))}, {}, r"`q` has rank 3 .*\(2, 10, 8\).*expected rank 4"),
    ({"k": jnp.zeros((2, 10, 2, 4))}, {}, r"`k` has shape \(2, 10, 2, 4\).*expected q's shape"),
    ({"v": jnp.zeros((2, 9, 4, 16))}, {}, r"`v` has shape \(2, 9, 4, 16\), expected \[B=2, T=10"),
    ({"v": jnp.zeros((2, 10, 3, 16)), "g": jnp.zeros((2, 10, 3)), "beta": jnp.zeros((2, 10, 3))},
     {}, r"H=3 value heads, not a multiple of the Hk=2"),
    ({"g": jnp.zeros((2, 10, 2))}, {}, r"`g` has shape \(2, 10, 2\), expected \[B, T, H\] = \(2, 10, 4\)"),
    ({"beta": jnp.zeros((2, 10))}, {}, r"`beta` has rank 2"),
    ({"q": jnp.zeros((2, 10, 2, 8), jnp.int32)}, {}, r"`q` has dtype int32; expected a floating"),
    ({}, {"initial_state": jnp.zeros((2, 4, 16, 8))},
     r"`initial_state` has shape \(2, 4, 16, 8\), expected \[B, H, K, V\] = \(2, 4, 8, 16\)"),
    ({}, {"segment_ids": jnp.zeros((2, 11), jnp.int32)}, r"`segment_ids` has shape \(2, 11\)"),
    ({}, {"segment_ids": jnp.zeros((2, 10), jnp.float32)}, r"`segment_ids` has dtype float32"),
    ({}, {"chunk_size": 48}, r"`chunk_size`=48; expected a power of two in \[16, 128\]"),
    ({}, {"chunk_size": 256}, r"`chunk_size`=256"),
    ({}, {"impl": "triton"}, r"unknown `impl`='triton'"),
    ({}, {"qk_norm_eps": 0.0}, r"`qk_norm_eps`=0.0; expected a positive Python float"),
    ({}, {"qk_norm_eps": jnp.float32(1e-6)}, r"`qk_norm_eps`=.*expected a positive Python float"),
])
def test_errors_name_argument_and_expectation(overrides, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    _call(overrides, **kwargs)


@pytest.mark.parametrize("diag_block", [1, 4, 8, None])
@pytest.mark.parametrize("C", [1, 2, 16, 64])
def test_unit_lower_inverse_matches_numpy(C, diag_block):
  from kernels_pallas.chunk_math import unit_lower_inverse
  r = np.random.default_rng(C)
  L = np.tril(r.normal(size=(3, 2, C, C)) * 0.5, -1)
  inverse = jax.jit(lambda x: unit_lower_inverse(x, diag_block))
  A = np.asarray(inverse(jnp.asarray(L, jnp.float32)))
  expected = np.linalg.inv(np.eye(C) + L)
  assert np.abs(A - expected).max() < 1e-4 * max(np.abs(expected).max(), 1.0)
  assert np.all(np.triu(A, 1) == 0)


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_chunked_schedules_agree_on_values_and_gradients(segments):
  """The parallel schedule (accelerators) and the fused one (CPU default) of the hand-written
  VJP give the same outputs, final state and gradients of every input, GVA and ragged T included."""
  from gdn_jax.ops.chunked import chunked_gated_delta_rule
  B, T, Hk, H, K, V = 2, 83, 1, 2, 16, 8
  x = make_inputs(13, B, T, Hk, H, K, V, segments=segments)
  reset = None if x["seg"] is None else jnp.asarray(
      np.concatenate([np.zeros((B, 1), bool), np.diff(x["seg"], axis=1) != 0], axis=1))
  r = np.random.default_rng(14)
  R_o, R_S = to_jax(r.normal(size=(B, T, H, V))), to_jax(r.normal(size=(B, H, K, V)))
  q, k = (jnp.repeat(to_jax(x[n]), H // Hk, axis=2) for n in ("q", "k"))

  def loss(fused, q, k, v, g, beta, h0):
    o, S = chunked_gated_delta_rule(q, k, v, g, beta, 0.3, h0, reset, 32, fused=fused)
    return jnp.sum(o * R_o) + jnp.sum(S * R_S)

  args = (q, k) + tuple(to_jax(x[n]) for n in ("v", "g", "beta", "h0"))
  results = {fused: jax.jit(jax.value_and_grad(functools.partial(loss, fused),
                                               argnums=tuple(range(6))))(*args)
             for fused in (False, True)}
  assert results[True][0] == pytest.approx(float(results[False][0]), rel=1e-5)
  for a, b in zip(results[True][1], results[False][1]):
    assert rel_err(a, b) < 1e-5


def test_chunked_backward_keeps_no_per_token_state():
  """What the chunked VJP keeps for the backward: the inputs plus one K×V state per chunk and head
  (O(T/C · K · V)); the recurrent reference keeps a state per token."""
  B, T, H, K, V, C = 1, 256, 2, 16, 16, 32
  x = make_inputs(15, B, T, H, H, K, V, with_h0=False)
  args = [to_jax(x[n]) for n in ("q", "k", "v", "g", "beta")]
  input_bytes = sum(a.size * 4 for a in args)
  state_bytes = B * H * K * V * 4

  def residual_bytes(impl):
    f = lambda *a: gated_delta_rule(*a, impl=impl, chunk_size=C)[0]
    _, vjp_fn = jax.vjp(f, *args)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(vjp_fn)
               if hasattr(leaf, "dtype"))

  assert residual_bytes("chunked") <= input_bytes + (T // C) * state_bytes + 1024
  assert residual_bytes("recurrent") >= T * state_bytes        # the per-token states
