"""gdn_jax.generate: bucketed prefill == exact prefill, greedy == argmax of the forward, one
compiled prefill per bucket and one decode program for every prompt length, state dtypes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax import generate as gen

from tests.model_test import CFG  # the same small model (GVA, K ≠ V) as the decode tests there
from tests.model_test import make as _make


def make(cfg=CFG, seed=0, scale=5.0):
  """model_test's random model with weights × 5 (× 10 there) so every path moves the logits."""
  return _make(cfg, seed, scale)


@nnx.jit
def forward(model, tok):
  return model(tok)


def test_bucket_lengths():
  assert [gen.bucket_length(t) for t in (1, 16, 17, 100, 1024, 1025, 4096, 5000)] == [
      16, 16, 32, 128, 1024, 2048, 4096, 5120]


def test_padded_prefill_equals_exact_prefill():
  """The left padding is a separate packed document: logits and cache equal the unpadded ones."""
  model = make(seed=1)
  graphdef, state = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(1), (2, 11), 0, 64)
  run = lambda length: gen.prefill_program(graphdef, state, *gen.pad_prompt(prompt, length),
                                           state_dtype=jnp.float32)
  exact, padded = run(11), run(32)
  for x, y in zip(jax.tree.leaves(exact), jax.tree.leaves(padded)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(exact[0], forward(model, prompt)[:, -1], atol=1e-4, rtol=1e-4)


def test_greedy_equals_forward_argmax_for_many_prompt_lengths_with_one_decode_program():
  model = make(seed=5)
  gen.decode_program.clear_cache()
  gen.prefill_program.clear_cache()
  for T in (1, 5, 16, 17, 30):
    prompt = jax.random.randint(jax.random.key(T), (2, T), 0, 64)
    out = gen.generate(model, prompt, 12, temperature=0.0, rng=jax.random.key(0))
    assert out.shape == (2, T + 12) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :T], prompt)
    # Each new token is the argmax of a full causal forward over the output so far.
    np.testing.assert_array_equal(out[:, T:], jnp.argmax(forward(model, out)[:, T - 1:-1], -1))
    exact = gen.generate(model, prompt, 12, temperature=0.0, rng=jax.random.key(0), bucket=False)
    np.testing.assert_array_equal(exact, out)
  assert gen.decode_program._cache_size() == 1          # one decode program for every prompt length
  # Buckets 16 and 32, plus the exact lengths 1, 5, 17 and 30 of bucket=False (16 is a bucket).
  assert gen.prefill_program._cache_size() == 2 + 4


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  model = make(seed=2)
  prompt = jax.random.randint(jax.random.key(2), (3, 4), 0, 64)
  a = gen.generate(model, prompt, 10, temperature=1.0, top_k=8, rng=jax.random.key(3))
  b = gen.generate(model, prompt, 10, temperature=1.0, top_k=8, rng=jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  greedy = gen.generate(model, prompt, 10, temperature=0.0, rng=jax.random.key(0))
  top1 = gen.generate(model, prompt, 10, temperature=0.7, top_k=1, rng=jax.random.key(4))
  np.testing.assert_array_equal(top1, greedy)


def test_bf16_state_is_stored_in_bf16_and_decodes():
  """The accuracy of a bf16 state is tested in model_test (within the bf16 forward's error)."""
  model = make(dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16"), seed=6)
  graphdef, state = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(6), (2, 9), 0, 64)
  _, cache = gen.prefill_program(graphdef, state, *gen.pad_prompt(prompt, 16),
                                 state_dtype=jnp.bfloat16)
  assert all(c['S'].dtype == jnp.bfloat16 for c in cache)
  kw = dict(temperature=0.0, rng=jax.random.key(0))
  f32 = gen.generate(model, prompt, 4, **kw)
  b16 = gen.generate(model, prompt, 4, state_dtype=jnp.bfloat16, **kw)
  np.testing.assert_array_equal(b16[:, :11], f32[:, :11])   # the prefill's token, one step


@pytest.mark.parametrize("impl, block_v, conv_ring, neg_eigval", [
    ("pallas", None, True, False), ("pallas_fused", None, True, False),
    ("pallas_fused", 4, True, False), ("pallas_fused", None, False, False),
    ("pallas_fused", None, True, True)])
def test_pallas_step_generates_what_the_xla_step_does(impl, block_v, conv_ring, neg_eigval):
  """Both kernels, and the fused one with another V block (DecodeConfig), on a window built per
  step instead of conv rings, and with β ∈ (0, 2) (the ring kernel makes the gates itself),
  sample the XLA step's tokens (10 tokens: the rings wrap)."""
  from kernels_pallas.config import DecodeConfig
  # K = 8, V = 12: interpret mode on CPU takes any head dims
  model = make(dataclasses.replace(CFG, allow_neg_eigval=neg_eigval), seed=8)
  prompt = jax.random.randint(jax.random.key(8), (2, 6), 0, 64)
  kw = dict(temperature=1.0, top_k=10, rng=jax.random.key(1))
  config = DecodeConfig(block_v=block_v, conv_ring=conv_ring)
  np.testing.assert_array_equal(
      gen.generate(model, prompt, 10, impl=impl, decode_config=config, **kw),
      gen.generate(model, prompt, 10, impl="xla", **kw))


@pytest.mark.parametrize("new_tokens", [1, 6])
def test_the_ring_loop_returns_the_window_loops_cache(new_tokens):
  """decode_program with conv rings hands back the cache in the usual layout: the same conv
  states and decode states as the window kernel's loop (1 token: no step; 6: the rings wrapped)."""
  from kernels_pallas.config import DecodeConfig
  model = make(dataclasses.replace(CFG, num_layers=2, layer_pattern="GA"), seed=10)
  graphdef, state = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(10), (2, 5), 0, 64)
  out = []
  for ring in (True, False):
    logits, cache = gen.prefill_program(graphdef, state, *gen.pad_prompt(prompt, 8),
                                        state_dtype=jnp.float32, max_len=8 + new_tokens)
    out.append(gen.decode_program(graphdef, state, logits, cache, jax.random.key(0),
                                  max_new_tokens=new_tokens, temperature=0.0, top_k=None,
                                  impl="pallas_fused", decode_config=DecodeConfig(conv_ring=ring)))
  (tokens, ring_cache), (window_tokens, window_cache) = out
  np.testing.assert_array_equal(tokens, window_tokens)
  assert jax.tree.structure(ring_cache) == jax.tree.structure(window_cache)
  assert 'conv' in ring_cache[0] and 'ring_q' not in ring_cache[0]
  np.testing.assert_array_equal(ring_cache[0]['conv'], window_cache[0]['conv'])
  for a, b in zip(jax.tree.leaves(ring_cache), jax.tree.leaves(window_cache)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


DECODE_VARIANTS = {"untied": CFG, "tied": dataclasses.replace(CFG, tie_embeddings=True),
                   "hybrid": dataclasses.replace(CFG, num_layers=2, layer_pattern="GA")}


@pytest.mark.parametrize("variant", sorted(DECODE_VARIANTS))
def test_padded_decode_products_equal_the_unpadded_ones(variant):
  """`matmul_rows` pads each decode product's batch with zero rows (a GEMM on GPUs instead of a
  batch-1 reduction): the same logits up to float32 rounding, and generate's greedy tokens."""
  model = make(DECODE_VARIANTS[variant], seed=9)
  prompt = jax.random.randint(jax.random.key(9), (2, 5), 0, 64)
  logits, cache = model.prefill(prompt, jnp.ones_like(prompt), last_only=True, max_len=16)
  token = jnp.argmax(logits[:, 0], -1)
  step = lambda rows: model.decode_step(token, cache, impl="xla", matmul_rows=rows)[0]
  np.testing.assert_allclose(step(8), step(1), rtol=1e-5, atol=1e-5)
  assert not np.array_equal(np.asarray(step(1)), 0.0)
  if variant == "untied":   # end to end once, through the decode program (one compile)
    kw = dict(temperature=0.0, rng=jax.random.key(2))
    padded = gen.generate(model, prompt, 4, matmul_rows=8, **kw)
    np.testing.assert_array_equal(padded[:, 5:6], jnp.argmax(logits[:, 0], -1)[:, None])
    np.testing.assert_array_equal(padded[:, 6], jnp.argmax(step(8), -1))


def test_default_matmul_rows_pads_only_on_gpus():
  """generate's default (None) pads batch-1 decode products to 8 rows on GPUs only (the measured
  H100 win, experiments/NOTES_decode.md); elsewhere it is 1, so CPU runs are unpadded."""
  assert [gen.default_matmul_rows(b) for b in ("gpu", "cuda", "rocm")] == [8, 8, 8]
  assert [gen.default_matmul_rows(b) for b in ("cpu", "tpu")] == [1, 1]
  assert gen.default_matmul_rows() == (8 if jax.default_backend() == "gpu" else 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"matmul_rows": 0}, "matmul_rows"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 65}, "top_k"),
    ({"impl": "cuda"}, "impl"),
    ({"state_dtype": jnp.float16}, "state_dtype"),
    ({"decode_config": {"block_v": 8}}, "decode_config"),
])
def test_generate_errors(kwargs, match):
  args = {"max_new_tokens": 2, **kwargs}
  with pytest.raises(ValueError, match=match):
    gen.generate(make(), jnp.zeros((1, 3), jnp.int32), args.pop("max_new_tokens"),
                 rng=jax.random.key(0), **args)
  with pytest.raises(ValueError, match="prompt_BxT"):
    gen.generate(make(), jnp.zeros((1, 0), jnp.int32), 2, rng=jax.random.key(0))
