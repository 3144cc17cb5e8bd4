"""GatedDeltaNetLM: shapes, exact sizes, decoding == forward, packing, gradients, validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gdn_jax.generate import generate
from gdn_jax.model import GatedDeltaNetLM, ModelConfig, flops_per_token, num_params

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, head_k_dim=8,
                  head_v_dim=12, num_v_heads=4, mlp_hidden=48, chunk_size=16,
                  rule_impl="chunked")


def make(cfg=CFG, seed=0, scale=10.0):
  """A random model with weights large enough that every path moves the logits."""
  model = GatedDeltaNetLM(cfg, rngs=nnx.Rngs(seed))
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param) and path[-1] in ("kernel", "embedding"):
      v[...] = v[...] * scale
  return model


def tokens(B, T, seed=0, vocab=64):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)


@nnx.jit
def forward(model, tok, seg=None):
  return model(tok, seg)


@nnx.jit
def decode_all(model, tok):
  """Token-by-token decode_step over the whole sequence (lax.scan)."""
  def body(cache, t_B):
    logits, cache = model.decode_step(t_B, cache)
    return cache, logits
  _, logits_TxBxV = jax.lax.scan(body, model.init_cache(tok.shape[0]), tok.T)
  return jnp.moveaxis(logits_TxBxV, 0, 1)


def test_shapes_dtypes_and_bf16():
  model = make()
  logits = forward(model, tokens(2, 32))
  assert logits.shape == (2, 32, 64) and logits.dtype == jnp.float32
  bf16 = GatedDeltaNetLM(dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16"),
                         rngs=nnx.Rngs(0))
  out = forward(bf16, tokens(2, 32))
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True, "use_gate": False},
                                     {"use_short_conv": False, "num_v_heads": None,
                                      "mlp_hidden": None}])
def test_num_params_is_exact(changes):
  cfg = dataclasses.replace(CFG, **changes)
  abstract = nnx.eval_shape(lambda: GatedDeltaNetLM(cfg, rngs=nnx.Rngs(0)))
  counted = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert num_params(cfg) == counted


def test_flops_per_token_counts_matmuls_conv_and_rule():
  cfg = CFG
  matmul = num_params(cfg) - cfg.vocab_size * cfg.d_model  # minus the embedding lookup
  matmul -= cfg.num_layers * (2 * 4 + 12 + 4 * (2 * 16 + 48) + 2 * 32) + 32  # minus vectors
  K, V, C, H = 8, 12, 16, 4
  rule = (6 * K * V + 5.25 * C * K + 4 * C * V + C * C / 2) + (16 * K * V + 18 * C * K
                                                               + 10 * C * V + 4 * C * C)
  expected = 6 * matmul + 2 * (6 * 4 * (2 * 16 + 48) + H * rule)
  assert flops_per_token(cfg, 64) == pytest.approx(expected)
  with pytest.raises(ValueError, match="seq_len"):
    flops_per_token(cfg, 0)


def with_multipliers(model):
  """Forward multipliers ≠ 1 on every Linear and the embedding (as μP sets some of them), so the
  decode path must apply each one where the forward does."""
  for i, (_, module) in enumerate(nnx.iter_modules(model)):
    if hasattr(module, "multiplier"):
      module.multiplier = 0.5 + 0.1 * (i % 7)
    if hasattr(module, "attend_multiplier"):
      module.attend_multiplier = 0.7
  return model


DECODE_CONFIGS = {  # name: (config changes, forward multipliers ≠ 1)
    "gva": ({}, False),                                     # CFG: 4 value heads on 2 q/k heads
    "gva_multipliers": ({}, True),
    "no_conv": ({"use_short_conv": False}, True),
    "no_gate_neg_eigval": ({"use_gate": False, "allow_neg_eigval": True}, True),
    "tied_no_gva": ({"tie_embeddings": True, "num_v_heads": None}, True),
}


@pytest.mark.parametrize("name", sorted(DECODE_CONFIGS))
def test_decode_steps_equal_forward(name):
  changes, multipliers = DECODE_CONFIGS[name]
  model = make(dataclasses.replace(CFG, **changes))
  if multipliers:
    with_multipliers(model)
  tok = tokens(2, 32)
  full = forward(model, tok)                 # chunked rule
  stepped = decode_all(model, tok)           # conv cache + fused single-token rule
  assert float(jnp.abs(full).max()) > 1.0    # the test can see differences
  np.testing.assert_allclose(stepped, full, atol=1e-4, rtol=1e-4)


def test_decode_equals_forward_for_a_mup_model():
  from gdn_jax.mup import build_model
  base = dataclasses.replace(CFG, d_model=16, num_heads=1, num_v_heads=2, mlp_hidden=24)
  model = build_model(CFG, parametrization="mup", base_config=base, rngs=nnx.Rngs(3))
  tok = tokens(2, 24, seed=3)
  np.testing.assert_allclose(decode_all(model, tok), forward(model, tok), atol=1e-4, rtol=1e-4)


@nnx.jit(static_argnames=("state_dtype",))
def decode_all_cast(model, tok, state_dtype):
  def body(cache, t_B):
    logits, cache = model.decode_step(t_B, cache, model.decode_weights())
    return cache, logits
  _, logits_TxBxV = jax.lax.scan(body, model.init_cache(tok.shape[0], state_dtype), tok.T)
  return jnp.moveaxis(logits_TxBxV, 0, 1)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_bf16_decode_error_is_the_forwards_own(param_dtype, state_dtype):
  """bf16 compute: decoding is as far from an fp32 forward of the same weights as the bf16
  forward is (its own rounding error, measured here, sets the bound), also with a bf16 state."""
  bf16 = make(dataclasses.replace(CFG, dtype="bfloat16", param_dtype=param_dtype), scale=1.0)
  fp32 = make(CFG, scale=1.0)
  nnx.update(fp32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(bf16)))
  tok = tokens(2, 64, seed=7)
  ref = forward(fp32, tok)
  fwd_err = ref - forward(bf16, tok)
  dec_err = ref - decode_all_cast(bf16, tok, jnp.dtype(state_dtype))
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
  assert 0 < rms(fwd_err) < 0.01 * float(jnp.abs(ref).max())
  # Measured on CPU: ratios 1.00 (float32 state; the logits equal the bf16 forward's) and
  # ≤ 1.12 (max) / 1.07 (rms) with a bf16 state.
  assert float(jnp.abs(dec_err).max()) <= 1.5 * float(jnp.abs(fwd_err).max())
  assert rms(dec_err) <= 1.25 * rms(fwd_err)


def test_prefill_then_decode_equals_forward():
  model = make(seed=1)
  tok = tokens(2, 32, seed=1)

  @nnx.jit
  def prefill_decode(model, tok):
    logits, cache = model.prefill(tok[:, :23])          # chunked, T not a chunk multiple
    def body(cache, t_B):
      step_logits, cache = model.decode_step(t_B, cache)
      return cache, step_logits
    _, rest_TxBxV = jax.lax.scan(body, cache, tok[:, 23:].T)
    return jnp.concatenate([logits, jnp.moveaxis(rest_TxBxV, 0, 1)], 1)

  np.testing.assert_allclose(prefill_decode(model, tok), forward(model, tok), atol=1e-4,
                             rtol=1e-4)


def test_prefill_continues_a_cache_and_gives_last_logits():
  model = make(seed=4)
  tok = tokens(2, 40, seed=4)

  @nnx.jit
  def two_prefills(model, tok):
    _, cache = model.prefill(tok[:, :17])                 # decode-form cache ...
    last, cache = model.prefill(tok[:, 17:], cache=cache, last_only=True)   # ... continued
    logits, _ = model.decode_step(tok[:, -1], model.prefill(tok[:, :-1])[1])
    return last, logits

  last, stepped = two_prefills(model, tok)
  full = forward(model, tok)
  assert last.shape == (2, 1, 64)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(stepped, full[:, -1], atol=1e-4, rtol=1e-4)


def test_packed_segments_equal_separate_runs():
  model = make(seed=2)
  a, b = tokens(1, 16, seed=3), tokens(1, 16, seed=4)
  packed = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1)], 0)
  seg = jnp.repeat(jnp.concatenate([jnp.zeros((1, 16), jnp.int32) + 7,
                                    jnp.ones((1, 16), jnp.int32)], 1), 2, axis=0)
  out = forward(model, packed, seg)
  alone = forward(model, jnp.concatenate([a, b], 0))       # [a; b] run separately
  np.testing.assert_allclose(out[0, :16], alone[0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out[0, 16:], alone[1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out[1, 16:], alone[0], atol=1e-4, rtol=1e-4)
  # Without segment ids the second document does see the first.
  assert float(jnp.abs(forward(model, packed)[0, 16:] - alone[1]).max()) > 1e-2
  # The prefill cache of a packed prompt is the last document's cache.
  _, cache_packed = nnx.jit(lambda m, t, s: m.prefill(t, s))(model, packed, seg)
  _, cache_alone = nnx.jit(lambda m, t: m.prefill(t))(model, jnp.concatenate([b, a], 0))
  for x, y in zip(jax.tree.leaves(cache_packed), jax.tree.leaves(cache_alone)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_every_parameter_gets_a_gradient_under_jit():
  model = GatedDeltaNetLM(CFG, rngs=nnx.Rngs(0))
  tok = tokens(2, 33)

  @nnx.jit
  def loss_and_grad(model, tok):
    def loss_fn(model):
      logits = model(tok[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()
    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = loss_and_grad(model, tok)
  assert np.isfinite(float(loss))
  flat = nnx.to_flat_state(grads) if hasattr(nnx, "to_flat_state") else grads.flat_state()
  for path, g in flat:
    value = g[...] if hasattr(g, "__getitem__") and not isinstance(g, jax.Array) else g
    assert float(jnp.abs(value).max()) > 0, f"zero gradient for {path}"


def test_generate_greedy_matches_recomputed_argmax():
  model = make(seed=5, scale=5.0)
  prompt = tokens(2, 7, seed=5)
  out = generate(model, prompt, 25, temperature=0.0, rng=jax.random.key(0))
  assert out.shape == (2, 32) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :7], prompt)
  # Independent check: each new token is the argmax of a full (causal) forward on the output.
  np.testing.assert_array_equal(out[:, 7:], jnp.argmax(forward(model, out)[:, 6:-1], -1))
  top1 = generate(model, prompt, 25, temperature=1.0, top_k=1, rng=jax.random.key(1))
  np.testing.assert_array_equal(top1, out)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
])
def test_generate_errors(kwargs, match):
  args = {"max_new_tokens": 2, "temperature": 1.0, "top_k": None, **kwargs}
  with pytest.raises(ValueError, match=match):
    generate(make(), tokens(1, 3), args.pop("max_new_tokens"), rng=jax.random.key(0), **args)


def test_lm_head_init_std_draws_the_untied_head_only():
  model = GatedDeltaNetLM(dataclasses.replace(CFG, lm_head_init_std=0.2), rngs=nnx.Rngs(0))
  default = GatedDeltaNetLM(CFG, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.lm_head.kernel[...],
                             default.lm_head.kernel[...] * (0.2 / CFG.init_std), rtol=1e-5)
  np.testing.assert_array_equal(model.embed.embedding[...], default.embed.embedding[...])


def test_output_norm_eps_reaches_the_mixer_norm_only():
  model = GatedDeltaNetLM(dataclasses.replace(CFG, output_norm_eps=1e-3), rngs=nnx.Rngs(0))
  assert model.blocks[0].mixer.o_norm.eps == 1e-3
  assert model.blocks[0].mixer_norm.eps == model.final_norm.eps == CFG.norm_eps
  assert GatedDeltaNetLM(CFG, rngs=nnx.Rngs(0)).blocks[0].mixer.o_norm.eps == CFG.norm_eps


@pytest.mark.parametrize("changes, match", [
    ({"d_model": 0}, "d_model"),
    ({"num_heads": -2}, "num_heads"),
    ({"head_k_dim": 2.5}, "head_k_dim"),
    ({"num_v_heads": 3}, "num_v_heads"),
    ({"mlp_hidden": 0}, "mlp_hidden"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"output_norm_eps": -1e-3}, "output_norm_eps"),
    ({"output_norm_eps": True}, "output_norm_eps"),
    ({"qk_norm_eps": 0.0}, "qk_norm_eps"),
    ({"lm_head_init_std": 0.0}, "lm_head_init_std"),
    ({"lm_head_init_std": 0.05, "tie_embeddings": True}, "lm_head_init_std.*tie_embeddings"),
    ({"dtype": "float64"}, "dtype"),
    ({"rule_impl": "fast"}, "rule_impl"),
    ({"chunk_size": 48}, "chunk_size"),
    ({"rule_kernel_config": "walk_fwd_output=True"}, r"rule_kernel_config.*'chunked'"),
    ({"rule_impl": "pallas", "rule_kernel_config": "walk_fwd_outptu=True"},
     r"`rule_kernel_config`: GpuConfig spec .*'walk_fwd_outptu=True' is not field=value"),
    ({"rule_impl": "pallas", "rule_kernel_config": "walk_block_v=abc"}, r"value 'abc'"),
    ({"rule_impl": "pallas", "rule_kernel_config": "prep_block=24"}, r"`prep_block`=24"),
])
def test_config_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(CFG, **changes)


def test_rule_kernel_config_reaches_the_kernels_and_keeps_the_model(monkeypatch):
  """ModelConfig.rule_kernel_config: every GDN layer passes its GpuConfig to the Pallas rule
  (interpret mode here), and the fused walks give the default kernels' loss and gradients."""
  import kernels_pallas  # pylint: disable=import-outside-toplevel
  seen = []
  pallas = kernels_pallas.gated_delta_rule_pallas
  monkeypatch.setattr(kernels_pallas, "gated_delta_rule_pallas",
                      lambda *a: seen.append(a[-1]) or pallas(*a))
  spec = "walk_fwd_output=True,walk_fwd_from_a=True,walk_bwd_dv_local=True,walk_block_v=16"
  tok = tokens(2, 40, seed=5)

  def loss_and_grads(cfg):
    model = make(cfg, seed=3, scale=1.0)
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tok[:, :-1]))[..., 0])
    return nnx.value_and_grad(loss)(model)

  (plain, g_plain), (fused, g_fused) = (
      loss_and_grads(dataclasses.replace(CFG, rule_impl="pallas", rule_kernel_config=k))
      for k in ("", spec))
  assert seen[:2] == [None, None]                  # the two layers of the default model ...
  assert seen[-2:] == [kernels_pallas.GpuConfig.parse(spec)] * 2   # ... and of the fused one
  np.testing.assert_allclose(fused, plain, rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g_fused), nnx.to_flat_state(g_plain)):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_bad_tokens_raise():
  with pytest.raises(ValueError, match="tokens"):
    make()(jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    make()(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32))
