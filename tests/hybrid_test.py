"""Hybrid GDN + attention LMs (layer_pattern): decoding == forward, packing, generate, sizes,
μP == SP at the base width and the attention rules, the all-GDN pattern unchanged, errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gdn_jax import coord_check as cc_lib
from gdn_jax import mup
from gdn_jax.generate import generate
from gdn_jax.model import GatedDeltaNetLM, flops_per_token, num_params
from gdn_jax.train import config as config_lib
from tests.model_test import CFG, forward, make, tokens, with_multipliers

# GDN, gated full attention with GQA, sliding window of 5 (the ring wraps within T = 24).
HYB = dataclasses.replace(CFG, num_layers=3, layer_pattern="GAS", num_attn_heads=4,
                          num_kv_heads=2, attn_head_dim=8, attn_window=5, attn_output_gate=True)


@nnx.jit(static_argnames=("split",))
def decode_paths(model, tok, split):
  """(the forward; token-by-token decode_step from init_cache; prefill of tok[:, :split] then
  decode_step; two prefills, the second continuing the first's cache): logits [B, T, V] each."""
  T = tok.shape[1]

  def run(cache, tok_TxB):
    def body(cache, t_B):
      logits, cache = model.decode_step(t_B, cache)
      return cache, logits
    _, logits = jax.lax.scan(body, cache, tok_TxB)
    return jnp.moveaxis(logits, 0, 1)

  stepped = run(model.init_cache(tok.shape[0], max_len=T), tok.T)
  head, cache = model.prefill(tok[:, :split], max_len=T)
  prefilled = jnp.concatenate([head, run(cache, tok[:, split:].T)], 1)
  tail, _ = model.prefill(tok[:, split:], cache=cache)
  return model(tok), stepped, prefilled, jnp.concatenate([head, tail], 1)


def test_forward_equals_decoding_and_prefill():
  model = with_multipliers(make(HYB))   # multipliers ≠ 1: the step must apply each one
  full, *decoded = decode_paths(model, tokens(2, 24, seed=1), 13)
  assert float(jnp.abs(full).max()) > 1.0
  for out in decoded:
    np.testing.assert_allclose(out, full, atol=1e-4, rtol=1e-4)


def test_partial_rope_decoding_equals_the_forward():
  """rope_fraction 0.25 (Qwen3-Next's): 2 of the 8 dims of each head rotate. Token by token
  through the caches of the full and the sliding-window attention blocks == the forward."""
  model = make(dataclasses.replace(HYB, rope_fraction=0.25), seed=3)
  assert model.blocks[1].mixer.rope_dim == model.blocks[2].mixer.rope_dim == 2
  tok = tokens(2, 12, seed=6)

  @nnx.jit
  def run(model):
    def body(cache, t_B):
      logits, cache = model.decode_step(t_B, cache)
      return cache, logits
    _, logits = jax.lax.scan(body, model.init_cache(2, max_len=12), tok.T)
    return model(tok), jnp.moveaxis(logits, 0, 1)

  full, stepped = run(model)
  assert float(jnp.abs(full).max()) > 1.0
  np.testing.assert_allclose(stepped, full, atol=1e-4, rtol=1e-4)


def test_qwen3next_config_rotates_a_quarter_of_each_head():
  from configs import hybrid_qwen3next  # pylint: disable=import-outside-toplevel
  for size, H in (("tiny", 64), ("250m", 128)):
    c = config_lib.model_config(hybrid_qwen3next.get_config(size))
    assert (c.rope_fraction, c.resolved_attn_head_dim, c.rope_dim) == (0.25, H, H // 4)


def test_packed_documents_equal_separate_runs_and_the_prefill_cache_is_the_last_documents():
  model = make(HYB, seed=2)
  a, b = tokens(1, 9, seed=3), tokens(1, 11, seed=4)
  packed = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b[:, :9], a, b[:, 9:]],
                                                                         1)], 0)
  seg = jnp.asarray([[7] * 9 + [1] * 11, [2] * 9 + [3] * 9 + [4] * 2])

  @nnx.jit
  def run(model):
    out = model(packed, seg)
    _, cache = model.prefill(packed, seg, max_len=24)
    logits, _ = model.decode_step(a[:, 0].repeat(2), cache)
    alone_b = model(jnp.concatenate([b, a[:, :1]], 1))
    alone_tail = model(jnp.concatenate([b[:, 9:], a[:, :1]], 1))
    return out, logits, model(a), alone_b, alone_tail, model(packed)

  out, logits, alone_a, alone_b, alone_tail, unpacked = run(model)
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
  close(out[0, :9], alone_a[0])
  close(out[0, 9:], alone_b[0, :11])
  close(out[1, 9:18], alone_a[0])
  close(out[1, 18:], alone_tail[0, :2])
  # Decoding from the packed prefill's cache continues each row's last document only.
  close(logits[0], alone_b[0, -1])
  close(logits[1], alone_tail[0, -1])
  assert float(jnp.abs(unpacked[0, 9:] - alone_b[0, :11]).max()) > 1e-2


def test_generate_greedy_equals_forward_argmax():
  model = make(HYB, seed=5, scale=5.0)
  prompt = tokens(2, 7, seed=5)
  out = generate(model, prompt, 12, temperature=0.0, rng=jax.random.key(0))
  np.testing.assert_array_equal(out[:, :7], prompt)
  np.testing.assert_array_equal(out[:, 7:], jnp.argmax(forward(model, out)[:, 6:-1], -1))


@pytest.mark.parametrize("changes", [{}, {"attn_output_gate": False, "attn_qk_norm": False,
                                         "num_kv_heads": None, "tie_embeddings": True}])
def test_num_params_and_flops(changes):
  cfg = dataclasses.replace(HYB, **changes)
  abstract = nnx.eval_shape(lambda: GatedDeltaNetLM(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert num_params(cfg) == sum(int(np.prod(v.shape)) for v in leaves)
  # flops: per block 6 · its matrices; an attention block adds 12·N·H·ctx, ctx = (T + 1)/2
  # causal, mean_t min(t + 1, W) with the window; the head is counted once.
  f = lambda kind: flops_per_token(dataclasses.replace(cfg, num_layers=1, layer_pattern=kind), 64)
  D, V, N, Nkv, H = 32, 64, 4, cfg.resolved_num_kv_heads, 8
  head = 6 * D * V
  attn_mats = D * H * (2 * N + 2 * Nkv + (N if cfg.attn_output_gate else 0)) + 3 * D * 48
  assert f("A") - head == pytest.approx(6 * attn_mats + 12 * N * H * 65 / 2)
  assert f("S") - head == pytest.approx(6 * attn_mats + 12 * N * H * (1 + 2 + 3 + 4 + 5 * 60) / 64)
  assert flops_per_token(cfg, 64) == pytest.approx(f("G") + f("A") + f("S") - 2 * head)


def test_all_gdn_patterns_are_the_default_model():
  tok = tokens(2, 16)
  ref = make(CFG)
  ref_state = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
  ref_out = forward(ref, tok)
  for pattern in ("G", "GG"):
    model = make(dataclasses.replace(CFG, layer_pattern=pattern))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 ref_state)
    np.testing.assert_array_equal(forward(model, tok), ref_out)
  assert CFG.layer_kinds == ("G", "G") and not CFG.has_attention


def loss_fn(model, tok):
  logits = model(tok[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()


def heads_cfg(d, **kw):
  """Width scheme A for both mixers: heads ∝ d at head dims 8."""
  return dataclasses.replace(HYB, vocab_size=32, d_model=d, num_heads=d // 8, head_k_dim=8,
                             head_v_dim=8, num_v_heads=None, mlp_hidden=2 * d,
                             num_attn_heads=d // 8, num_kv_heads=d // 16, attn_head_dim=8,
                             num_layers=2, layer_pattern="GA", **kw)


def test_mup_equals_sp_at_base_width():
  """Same init, same forward, same gradients and the same first update under AdamW and SGD (as
  tests/mup_test.py for the GDN model)."""
  cfg = heads_cfg(32)
  tok = tokens(2, 17, vocab=32)
  sp, mu = (mup.build_model(cfg, parametrization=p, base_config=cfg, rngs=nnx.Rngs(1))
            for p in ("sp", "mup"))
  assert sp.blocks[1].mixer.scale == mu.blocks[1].mixer.scale == 8 ** -0.5
  params = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (sp, mu)]
  jax.tree.map(np.testing.assert_array_equal, *params)
  forward_and_grad = nnx.jit(lambda m: (m(tok), nnx.grad(loss_fn)(m, tok)))
  (logits_sp, g_sp), (logits_mu, g_mu) = forward_and_grad(sp), forward_and_grad(mu)
  np.testing.assert_array_equal(logits_sp, logits_mu)
  grads = [nnx.to_pure_dict(nnx.state(g, nnx.Param)) for g in (g_sp, g_mu)]
  jax.tree.map(np.testing.assert_array_equal, *grads)
  for optimizer in ("adamw", "sgd"):
    new = []
    for p, model, theta, g in zip(("sp", "mup"), (sp, mu), params, grads):
      tx = mup.make_optimizer(model, parametrization=p, optimizer=optimizer, learning_rate=0.05,
                              weight_decay=0.1, base_config=cfg, momentum=0.9)
      updates, _ = jax.jit(tx.update)(g, tx.init(theta), theta)
      new.append(optax.apply_updates(theta, updates))
    jax.tree.map(np.testing.assert_array_equal, *new)
    assert not np.array_equal(new[0]["lm_head"]["kernel"], params[0]["lm_head"]["kernel"])


def test_attention_rules_under_mup_sp_and_the_papers_refusal():
  base = dataclasses.replace(HYB, attn_head_dim=8)
  wide = dataclasses.replace(HYB, d_model=64, attn_head_dim=32, mlp_hidden=96)
  mu = mup.build_model(wide, parametrization="mup", base_config=base, rngs=nnx.Rngs(0))
  sp = mup.build_model(wide, parametrization="sp", base_config=base, rngs=nnx.Rngs(0))
  # Logit scale H_base^-½ · (H/H_base)^p: μP's 1/H form (√8/32), SP's 1/√H.
  assert mu.blocks[1].mixer.scale == pytest.approx(8 ** 0.5 / 32)
  assert sp.blocks[2].mixer.scale == pytest.approx(32 ** -0.5)
  classes = {".".join(map(str, p[2:])): i.cls for p, i in mup.param_infos(mu, base).items()
             if p[:2] == ("blocks", 1)}
  assert classes["mixer.q_proj.kernel"] == classes["mixer.o_proj.kernel"] == "hidden"
  assert classes["mixer.k_proj.kernel"] == classes["mixer.g_proj.kernel"] == "hidden"
  assert classes["mixer.q_norm.weight"] == "input"      # [H]: H grows in this scheme
  for p in ("paper", "paper_sp"):
    with pytest.raises(ValueError, match="paper's recipe.*attention"):
      mup.build_model(HYB, parametrization=p, rngs=nnx.Rngs(0))


def test_coord_check_builds_hybrid_widths():
  cc = cc_lib.CoordCheckConfig(scheme="head_dim", num_heads=4, layer_pattern="GA", num_layers=2)
  c = cc_lib.width_config(128, cc)
  assert (c.layer_kinds, c.num_attn_heads, c.num_kv_heads, c.attn_head_dim) == (("G", "A"), 4,
                                                                                2, 32)
  with pytest.raises(ValueError, match="layer_pattern"):
    cc_lib.CoordCheckConfig(scheme="paper", layer_pattern="GA")


@pytest.mark.parametrize("changes, match", [
    ({"layer_pattern": "GX"}, "layer_pattern"),
    ({"layer_pattern": "GGGA"}, "layer_pattern.*tile.*num_layers"),   # 4 letters, 3 layers
    ({"layer_pattern": ["G", "A", "S"]}, "layer_pattern"),
    ({"attn_window": 0}, "attn_window.*'S'"),
    ({"attn_window": -1}, "attn_window"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"num_attn_heads": 0}, "num_attn_heads"),
    ({"attn_head_dim": 7}, "attn_head_dim.*even"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_fraction": 0}, "rope_fraction.*0, 1"),
    ({"rope_fraction": 1.5}, "rope_fraction.*0, 1"),
    ({"rope_fraction": True}, "rope_fraction"),
    ({"rope_fraction": 0.375}, r"rope_fraction`=0.375 rotates .* = 3 dims.*even"),   # of H = 8
    ({"rope_fraction": 0.1}, r"rope_fraction`=0.1 rotates .* = 1 dims.*≥ 2"),
    ({"attn_output_gate": 1}, "attn_output_gate"),
])
def test_config_errors(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(HYB, **changes)


def test_odd_head_dim_is_fine_without_attention_and_max_len_errors():
  dataclasses.replace(CFG, head_k_dim=7)     # attention fields only matter with 'A' / 'S'
  dataclasses.replace(CFG, rope_fraction=0.375)
  model = make(HYB)
  with pytest.raises(ValueError, match="max_len"):
    model.init_cache(2)
  with pytest.raises(ValueError, match="max_len.*≥ 8"):
    model.prefill(tokens(1, 8), max_len=4)
  sliding = make(dataclasses.replace(HYB, layer_pattern="SG", num_layers=2))
  assert sliding.init_cache(1)[0]['k'].shape[1] == 5          # no max_len needed: W slots
