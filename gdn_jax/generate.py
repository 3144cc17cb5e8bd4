"""Sampling from a GatedDeltaNetLM: chunked prefill, then one recurrent step per new token.

    generate(model, prompt_BxT, max_new_tokens, *, temperature=1.0, top_k=None, rng,
             state_dtype=None, impl="xla", bucket=True, matmul_rows=None)
        -> tokens [B, T + max_new_tokens]

Two compiled programs per call, each cached by jax across calls:

  * `prefill_program` (`model.prefill`, the chunked rule), keyed on (batch, bucket): the prompt is
    left-padded to a bucket length (powers of two from 16, then multiples of 1024) as a separate
    packed document (segment id 0; the prompt is segment 1), so the state resets at the prompt and
    the short conv never reads the padding: any prompt length in a bucket reuses one program.
    Only the last position's logits are formed.
  * `decode_program`, keyed on (batch, max_new_tokens, sampling): the weights are cast to the
    compute dtype and fused (`model.decode_weights()`) once, before a `lax.scan` of
    `model.decode_step`; the prefill cache is donated to it, so the loop updates the states in
    place. No host work per token.

Decoding costs O(1) per token (a K×V state and W−1 conv inputs per value head), whatever the
prompt length. Hybrid models (gdn_jax.attention) add a KV ring per attention block: W slots for
sliding-window blocks, bucket + max_new_tokens slots for full-attention blocks (then the prefill
program is keyed on that capacity too). `state_dtype=jnp.bfloat16` stores the decode state in bfloat16 (half the state's
memory traffic, which dominates at large batch; the update itself is float32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

IMPLS = ("xla", "pallas", "pallas_fused")


def sample_logits(logits_BxV, rng, *, temperature: float = 1.0, top_k: int | None = None):
  """Samples one token per row. temperature 0 means greedy (argmax)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k is not None:
    kth_B = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_B, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def bucket_length(T: int) -> int:
  """The padded prompt length: the next power of two ≥ max(T, 16) up to 1024, then the next
  multiple of 1024 (at most 2× the work below 1024 tokens, < 1024 extra tokens above)."""
  if T <= 1024:
    return max(16, 1 << (T - 1).bit_length())
  return -(-T // 1024) * 1024


def pad_prompt(prompt_BxT, length: int):
  """(tokens [B, length], segment ids [B, length]): the prompt at the right end as segment 1,
  zeros before it as segment 0 (a separate packed document the prompt never sees)."""
  B, T = prompt_BxT.shape
  tokens = jnp.zeros((B, length), jnp.int32).at[:, length - T:].set(prompt_BxT.astype(jnp.int32))
  segments = jnp.broadcast_to((jnp.arange(length) >= length - T).astype(jnp.int32), (B, length))
  return tokens, segments


@functools.partial(jax.jit, static_argnames=('graphdef', 'state_dtype', 'max_len'))
def prefill_program(graphdef, state, tokens_BxP, segment_ids_BxP, *, state_dtype, max_len=None):
  """(the last position's logits [B, V] float32, the decode cache). `max_len`: the KV capacity
  of full-attention blocks (hybrid models; None otherwise)."""
  model = nnx.merge(graphdef, state)
  logits_Bx1xV, cache = model.prefill(tokens_BxP, segment_ids_BxP, last_only=True,
                                      state_dtype=state_dtype, max_len=max_len)
  return logits_Bx1xV[:, 0], cache


@functools.partial(jax.jit, donate_argnames=('cache',),
                   static_argnames=('graphdef', 'max_new_tokens', 'temperature', 'top_k', 'impl',
                                    'matmul_rows', 'decode_config'))
def decode_program(graphdef, state, logits_BxV, cache, rng, *, max_new_tokens, temperature,
                   top_k, impl, matmul_rows=1, decode_config=None):
  """(the max_new_tokens tokens sampled after the prompt [B, N], the final cache)."""
  model = nnx.merge(graphdef, state)
  weights = model.decode_weights(decode_config)   # cast and fused once, outside the loop
  rng, first_rng = jax.random.split(rng)
  token_B = sample_logits(logits_BxV, first_rng, temperature=temperature, top_k=top_k)

  # impl "pallas_fused" keeps the conv states as rings during the loop (decode_fused.py): converted
  # here once, and back after it; step i's token replaces ring row i mod W.
  rings = (impl == "pallas_fused" and model.config.use_short_conv
           and (decode_config is None or decode_config.conv_ring))
  W = model.config.conv_size
  if rings:
    cache = conv_rings(model, cache)

  def step(carry, xs):
    step_rng, pos_W = xs
    token_B, cache = carry
    cache_in = [dict(c, ring_pos=pos_W) if 'ring_q' in c else c for c in cache]
    logits_BxV, cache = model.decode_step(token_B, cache_in, weights, impl=impl,
                                          matmul_rows=matmul_rows, decode_config=decode_config)
    with jax.named_scope("sample"):
      next_B = sample_logits(logits_BxV, step_rng, temperature=temperature, top_k=top_k)
    return (next_B, cache), token_B

  rngs = jax.random.split(rng, max_new_tokens - 1)
  pos_NxW = (jnp.broadcast_to((jnp.arange(max_new_tokens - 1, dtype=jnp.int32) % W)[:, None],
                              (max_new_tokens - 1, W)) if rings else None)   # None: no scan input
  (last_B, cache), tokens_NxB = jax.lax.scan(step, (token_B, cache), (rngs, pos_NxW))
  if rings:
    cache = conv_states(cache, (max_new_tokens - 1) % W)
  # The final cache is returned so that it can alias the donated one (the loop then works in the
  # prefill's buffers, without a copy of the states).
  return jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1), cache


def conv_rings(model, cache):
  """The decode cache with every GDN layer's conv state [B, W − 1, C] as the rings of the fused
  ring kernel ('ring_q', 'ring_k', 'ring_v'; the next token replaces row 0)."""
  from kernels_pallas.decode_fused import ring_from_state  # pylint: disable=import-outside-toplevel
  out = []
  for block, c in zip(model.blocks, cache):
    if 'conv' in c:
      rq, rk, rv = ring_from_state(c['conv'], block.mixer.num_heads, block.mixer.head_k_dim)
      c = {**{k: v for k, v in c.items() if k != 'conv'}, 'ring_q': rq, 'ring_k': rk,
           'ring_v': rv}
    out.append(c)
  return out


def conv_states(cache, pos):
  """`conv_rings` undone, for rings whose next token would replace row `pos`."""
  from kernels_pallas.decode_fused import state_from_ring  # pylint: disable=import-outside-toplevel
  names = ('ring_q', 'ring_k', 'ring_v')
  return [{**{k: v for k, v in c.items() if k not in names},
           'conv': state_from_ring(tuple(c[n] for n in names), pos)} if 'ring_q' in c else c
          for c in cache]


def default_matmul_rows(backend: str | None = None) -> int:
  """`generate`'s default `matmul_rows`: 8 on GPUs, where XLA lowers a batch-1 weight product to
  a reduction fusion and a GEMM on 8 padded rows is faster (measured: experiments/NOTES_decode.md),
  else 1 (TPUs pad to their tiles themselves; on CPUs the padding is work)."""
  return 8 if (backend or jax.default_backend()) in ("gpu", "cuda", "rocm") else 1


def check_sampling(vocab_size: int, max_new_tokens, temperature, top_k, where="generate"):
  """Raises ValueError naming a bad sampling argument (shared with the sampling CLI)."""
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"{where}: `max_new_tokens`={max_new_tokens!r}; expected an int ≥ 1.")
  if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
      or not temperature >= 0):
    raise ValueError(f"{where}: `temperature`={temperature!r}; expected a float ≥ 0 "
                     "(0 = greedy).")
  if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                            or not 1 <= top_k <= vocab_size):
    raise ValueError(f"{where}: `top_k`={top_k!r}; expected None or an int in "
                     f"[1, {vocab_size}] (the vocabulary size).")


def generate(model, prompt_BxT, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, rng, state_dtype=None, impl: str = "xla",
             bucket: bool = True, matmul_rows: int | None = None,
             decode_config=None) -> jax.Array:
  """Returns [B, T + max_new_tokens] int32: the prompt followed by the sampled tokens.

  Args:
    model: a GatedDeltaNetLM.
    prompt_BxT: integer prompt tokens, T ≥ 1.
    max_new_tokens: tokens to sample (≥ 1).
    temperature: softmax temperature; 0 means greedy.
    top_k: sample among the k most likely tokens only (None: all).
    rng: a jax PRNG key.
    state_dtype: dtype of the decode state S (None: float32).
    impl: the rule's single-token update, "xla" (fused jnp), "pallas" (one kernel per layer
      that reads and writes the state once; kernels_pallas/decode_step.py) or "pallas_fused"
      (that kernel with the short conv, SiLU and q/k L2 norms inside;
      kernels_pallas/decode_fused.py).
    bucket: pad the prompt to `bucket_length(T)` (one prefill program per bucket); False
      compiles the prefill for the exact length.
    matmul_rows: each decode step's weight products run on the batch padded with zero rows to
      at least this many (`layers.decode_dot`: a GEMM instead of XLA's batch-1 reduction on
      GPUs; exact). 1 = no padding; None = `default_matmul_rows()` (8 on GPUs, else 1).
    decode_config: launch settings of the "pallas" / "pallas_fused" kernels
      (`kernels_pallas.config.DecodeConfig`: V block, warps); None: their defaults.
  """
  prompt_BxT = jnp.asarray(prompt_BxT)
  if (prompt_BxT.ndim != 2 or prompt_BxT.shape[1] < 1
      or not jnp.issubdtype(prompt_BxT.dtype, jnp.integer)):
    raise ValueError(f"generate: `prompt_BxT` has shape {tuple(prompt_BxT.shape)} and dtype "
                     f"{prompt_BxT.dtype}; expected integer tokens [B, T] with T ≥ 1.")
  check_sampling(model.config.vocab_size, max_new_tokens, temperature, top_k)
  if impl not in IMPLS:
    raise ValueError(f"generate: `impl`={impl!r}; expected one of {IMPLS}.")
  if matmul_rows is None:
    matmul_rows = default_matmul_rows()
  if not isinstance(matmul_rows, int) or isinstance(matmul_rows, bool) or matmul_rows < 1:
    raise ValueError(f"generate: `matmul_rows`={matmul_rows!r}; expected an int ≥ 1 (1 = no "
                     "padding; 8 or 16 to make batch-1 products GEMMs).")
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  if decode_config is not None and not isinstance(decode_config, DecodeConfig):
    raise ValueError(f"generate: `decode_config`={decode_config!r}; expected None or a "
                     "kernels_pallas.config.DecodeConfig(block_v=..., num_warps=...).")
  state_dtype = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  if state_dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"generate: `state_dtype`={state_dtype}; expected float32 or bfloat16.")
  graphdef, state = nnx.split(model)
  T = prompt_BxT.shape[1]
  tokens, segments = pad_prompt(prompt_BxT, bucket_length(T) if bucket else T)
  full_attention = "A" in getattr(model.config, "layer_kinds", ())
  max_len = tokens.shape[1] + max_new_tokens if full_attention else None
  logits_BxV, cache = prefill_program(graphdef, state, tokens, segments, state_dtype=state_dtype,
                                      max_len=max_len)
  new_BxN, _ = decode_program(graphdef, state, logits_BxV, cache, rng,
                              max_new_tokens=max_new_tokens, temperature=float(temperature),
                              top_k=top_k, impl=impl, matmul_rows=matmul_rows,
                              decode_config=decode_config)
  return jnp.concatenate([prompt_BxT.astype(jnp.int32), new_BxN], axis=1)
