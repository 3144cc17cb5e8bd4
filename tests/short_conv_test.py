"""kernels_pallas/short_conv.py (interpret mode on CPU): the Pallas short conv + SiLU and its
hand-written VJP, by both backwards (two_pass, one_pass), against the XLA path of
`layers.ShortConv`, a float64 NumPy reference and each other, with packed documents (boundaries
inside a tile, on a tile edge, a document shorter than the window), T and C not multiples of the
blocks, tiles shorter than the window, W = 1 … 4, one or several T tiles per backward program; a
model with ModelConfig.conv_impl="pallas" against "xla"; argument errors; and the kernels'
lowering to Triton for an H100."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax.layers import ShortConv
from gdn_jax.model import GatedDeltaNetLM, ModelConfig
from kernels_pallas.short_conv import BACKWARDS, backward_groups, short_conv_silu
from tests.np_reference import short_conv_grads_ref, short_conv_ref
from tests.triton_export import TRITON_CALL, export_for_h100, triton_launch


def documents(B, T):
  """Segment ids [B, T]: row 0 starts documents at 5 (inside the first 8-row tile), 16 (a tile
  edge) and 18 (a 2-token document, shorter than the window); row 1 at T − 7."""
  starts = [[5, 16, 18], [T - 7]]
  return jnp.array([[sum(s <= t for s in starts[b % 2]) for t in range(T)] for b in range(B)],
                   jnp.int32)


def inputs(B, T, C, W, dtype, seed=0):
  """x [B, T, C] in `dtype`, float32 filters w [W, C] ~ N(0, 1/W) and a cotangent r [B, T, C]."""
  kx, kw, kr = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (B, T, C), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (W, C), jnp.float32) * W ** -0.5
  return x, w, jax.random.normal(kr, (B, T, C), jnp.float32)


def conv_layer(impl, w, dtype):
  conv = ShortConv(w.shape[1], w.shape[0], dtype=dtype, param_dtype=w.dtype, rngs=nnx.Rngs(0),
                   impl=impl)
  conv.weight[...] = w
  return conv


def xla_conv(x, w, seg):
  """ShortConv's XLA path (float32 filters cast to x's dtype, as the model's)."""
  return conv_layer("xla", w, x.dtype)(x, seg)[0]


def pallas_conv(**launch):
  """short_conv_silu interpreted with `launch`'s keywords (filters cast to x's dtype, as the
  model's)."""
  return lambda x, w, seg: short_conv_silu(x, w.astype(x.dtype), seg, interpret=True, **launch)


def value_and_grads(conv, x, w, seg, r):
  """(y, dx, dw) of Σ r ⊙ y: one forward and its pullback, in one jitted program."""
  def run(x, w, seg, r):
    y, pullback = jax.vjp(lambda x, w: conv(x, w, seg), x, w)
    return y, *pullback(r.astype(y.dtype))
  return jax.jit(run)(x, w, seg, r)


def assert_close(got, want, rel):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("W, T, C, min_programs, segments, dtype, blocks", [
    (4, 37, 40, 1, True, jnp.float32, (8, 16)),       # one group: a program walks all 5 tiles
    (4, 37, 40, 12, False, jnp.float32, (8, 16)),     # 2 groups of 3 tiles, the last past T
    (4, 37, 40, 1000, True, jnp.bfloat16, (8, 16)),   # one tile per program
    (2, 24, 32, 12, True, jnp.float32, (8, 16)),      # T and C multiples of the blocks
    (3, 21, 16, 1, True, jnp.float32, (8, 16)),       # W not a power of two
    (1, 13, 16, 1, True, jnp.float32, (8, 16)),       # no taps back
    (4, 37, 40, 1, True, jnp.float32, (16, 32)),      # 3 tiles, 2 channel blocks, C ragged
    (4, 37, 40, 1, True, jnp.bfloat16, (2, 8))])      # tiles shorter than the window
def test_kernel_equals_the_xla_conv(W, T, C, min_programs, segments, dtype, blocks):
  """y, dx and dw of the kernels (BT × BC tiles) by each backward equal ShortConv's XLA path:
  float32 to rounding, bfloat16 within a few ulps (XLA sums the taps' dx in bfloat16, the kernels
  in float32); the two backwards make the same float32 sums, so they agree to rounding."""
  B = 2
  x, w, r = inputs(B, T, C, W, dtype)
  seg = documents(B, T) if segments else None
  block_t, block_c = blocks
  rel = 1e-5 if dtype == jnp.float32 else 2 ** -6
  want = value_and_grads(xla_conv, x, w, seg, r)
  results = {}
  for backward in BACKWARDS:
    results[backward] = value_and_grads(
        pallas_conv(block_t=block_t, block_c=block_c, min_programs=min_programs,
                    backward=backward), x, w, seg, r)
    for got, expected in zip(results[backward], want):
      assert got.dtype == expected.dtype and got.shape == expected.shape
      assert_close(got, expected, rel)
  for a, b in zip(*results.values()):
    assert_close(a, b, 1e-6 if dtype == jnp.float32 else 2 ** -8)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("segments", [False, True])
def test_kernel_equals_the_float64_reference(segments, backward):
  B, T, C, W = 2, 37, 40, 4
  x, w, r = inputs(B, T, C, W, jnp.float32, seed=1)
  seg = documents(B, T) if segments else None
  y, dx, dw = value_and_grads(
      pallas_conv(block_t=8, block_c=16, min_programs=12, backward=backward), x, w, seg, r)
  seg_np = None if seg is None else np.asarray(seg)
  y_ref, _ = short_conv_ref(x, w, seg_np)
  dx_ref, dw_ref = short_conv_grads_ref(x, w, r, seg_np)
  for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("T", [2, 19])
def test_layer_returns_the_xla_paths_conv_state(T):
  """ShortConv(impl="pallas") without a state: the XLA path's y and new state (the last W − 1
  inputs of the last document; T < W − 1 keeps zeros of the fresh state); with a state
  (prefill from a cache) it is the XLA path."""
  B, C, W = 2, 16, 4
  x, w, _ = inputs(B, T, C, W, jnp.float32, seed=2)
  seg = documents(B, T)
  state = jax.random.normal(jax.random.key(3), (B, W - 1, C))
  xla, pallas = conv_layer("xla", w, jnp.float32), conv_layer("pallas", w, jnp.float32)
  for args in ((x, None), (x, seg), (x, seg, state)):
    for got, want in zip(pallas(*args), xla(*args)):
      assert got.shape == want.shape
      assert_close(got, want, 1e-6)
  # The state from the inputs themselves: [zeros, x]'s last W − 1 rows, other documents zeroed.
  x_p = np.concatenate([np.zeros((B, W - 1, C)), np.asarray(x)], axis=1)[:, -(W - 1):]
  seg_np = np.asarray(seg)
  seg_p = np.concatenate([np.repeat(seg_np[:, :1], W - 1, axis=1), seg_np], axis=1)
  same_doc = seg_p[:, -(W - 1):] == seg_np[:, -1:]
  assert same_doc.all() == (T <= 18)        # at T = 19 row 0's last document starts at t = 18
  assert_close(pallas(x, seg)[1], np.where(same_doc[..., None], x_p, 0.0), 1e-7)


def test_model_with_the_pallas_conv_equals_the_xla_conv():
  """conv_impl="pallas" keeps the parameters, and gives the loss and every gradient of "xla",
  with packed documents."""
  config = ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=2, head_k_dim=16,
                       head_v_dim=16, num_v_heads=4, mlp_hidden=48, chunk_size=16,
                       rule_impl="recurrent")
  tokens = jax.random.randint(jax.random.key(4), (2, 41), 0, 61)
  seg = documents(2, 40)
  results = []
  for impl in ("xla", "pallas"):
    graphdef, params = nnx.split(GatedDeltaNetLM(dataclasses.replace(config, conv_impl=impl),
                                                 rngs=nnx.Rngs(0)))
    loss = lambda p: nnx.merge(graphdef, p).loss(tokens[:, :-1], tokens[:, 1:], seg)
    results.append((params, jax.jit(jax.value_and_grad(loss))(params)))
  (p0, (l0, g0)), (p1, (l1, g1)) = results
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert_close(a, b, 1e-5)


def test_backward_groups_fill_an_h100():
  """The 512M model's convs (B 8, T 2048, 32 × 128 tiles): ≥ 1024 programs; every tile in one
  group; tiny shapes: no more groups than tiles."""
  for C, expected in ((3072, (6, 11)), (1536, (11, 6))):
    G, tiles = backward_groups(8, 2048, C, 32, 128, 1024)
    assert (G, tiles) == expected
    assert 8 * G * (C // 128) >= 1024 and (G - 1) * tiles < 2048 // 32 <= G * tiles
  assert backward_groups(2, 37, 40, 8, 16, 1000) == (5, 1)
  assert backward_groups(2, 37, 40, 8, 16, 1) == (1, 5)


def triton_result_types(text: str, name: str) -> str:
  """The result types of the Triton launch named `name` in an exported module."""
  i = text.index(f'name = "{name}"')
  line = text[text.rindex("\n", 0, i):text.index("\n", i)]
  return line.split(") -> ")[-1].split(" loc(")[0]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("segments", [False, True])
def test_kernels_lower_to_triton_for_h100(segments, backward):
  """Forward and backward of the 512M model's q/k conv (bf16, C = 1536) and v conv (C = 3072)
  lower to the Triton calls of the module docstring, with its grids and 4 warps: the forward, then
  two_pass's dz (float32) and dx, dw kernels, or one_pass's single kernel."""
  sds = jax.ShapeDtypeStruct
  B, T, W = 8, 2048, 4
  seg = sds((B, T), jnp.int32) if segments else None

  def loss(x, w, seg):
    return jnp.sum(short_conv_silu(x, w, seg, backward=backward,
                                   interpret=False).astype(jnp.float32))

  for C, groups in ((1536, 11), (3072, 6)):      # backward_groups(8, 2048, C, 32, 128, 1024)[0]
    text = export_for_h100(jax.value_and_grad(loss, argnums=(0, 1)),
                           sds((B, T, C), jnp.bfloat16), sds((W, C), jnp.bfloat16), seg)
    assert triton_launch(text, "short_conv_fwd") == ((B, T // 32, C // 128), 1, 4)
    if backward == "two_pass":
      assert text.count(TRITON_CALL) == 3 and 'name = "short_conv_bwd"' not in text
      assert triton_launch(text, "short_conv_bwd_dz") == ((B, T // 32, C // 128), 1, 4)
      assert triton_result_types(text, "short_conv_bwd_dz") == f"tensor<{B}x{T}x{C}xf32>"
      assert triton_launch(text, "short_conv_bwd_dxdw") == ((B, groups, C // 128), 1, 4)
      assert triton_result_types(text, "short_conv_bwd_dxdw") == (
          f"(tensor<{B}x{T}x{C}xbf16>, tensor<{B * groups}x{W}x{C}xf32>)")
    else:
      assert text.count(TRITON_CALL) == 2 and "short_conv_bwd_d" not in text
      assert triton_launch(text, "short_conv_bwd") == ((B, groups, C // 128), 1, 4)


@pytest.mark.parametrize("change, match", [
    (dict(x=(2, 8)), "`x` has shape"),
    (dict(w=(4, 15)), "`w` has shape"),
    (dict(w=(0, 16)), "`w` has shape"),
    (dict(x_dtype=jnp.int32), "`x` has dtype"),
    (dict(seg=(2, 7)), "`segment_ids` has shape"),
    (dict(seg_dtype=jnp.float32), "`segment_ids`"),
    (dict(block_t=24), "`block_t`=24"),
    (dict(block_c=0), "`block_c`=0"),
    (dict(num_warps=3), "`num_warps`=3"),
    (dict(min_programs=0), "`min_programs`=0"),
    (dict(backward="three_pass"), "`backward`='three_pass'; expected one of \\('two_pass', "
                                  "'one_pass'\\)")])
def test_errors_name_the_argument(change, match):
  x = jnp.zeros(change.pop("x", (2, 8, 16)), change.pop("x_dtype", jnp.float32))
  w = jnp.zeros(change.pop("w", (4, 16)))
  seg = jnp.zeros(change.pop("seg", (2, 8)), change.pop("seg_dtype", jnp.int32))
  with pytest.raises(ValueError, match=match):
    short_conv_silu(x, w, seg, interpret=True, **change)


def test_model_config_names_the_conv_impl():
  with pytest.raises(ValueError, match="conv_impl"):
    ModelConfig(conv_impl="triton")
