"""The language-modelling loss shared by training, sweeps and the coordinate check.

    cross_entropy(logits, targets)                  mean −log softmax(logits)[target], float32
    linear_cross_entropy(h, w, targets, ...)        the same for logits = m · h W, computed over
                                                     chunks of tokens: the [N, V] logits never exist

The chunked form (a "fused linear cross-entropy") computes, for token chunks c (time slices of
about `chunk_size` tokens, the batch axis whole),

    z_c = m · h_c W  (float32 accumulation),   lse_c = logsumexp(z_c),   ℓ_c = lse_c − z_c[y_c]

and keeps only h, W and lse (N floats) for the backward, which recomputes z_c chunk by chunk:

    ∂ℓ/∂z_c = (softmax(z_c) − onehot(y_c)) / N,   dh_c = m · ∂z_c Wᵀ,   dW = Σ_c m · h_cᵀ ∂z_c.

At a 32k vocabulary and 8 × 2048 tokens the plain loss holds [N, V] float32 logits and their
gradient (2 × 2.1 GB) in memory and streams them several times; the chunked one holds
chunk_size × V, at the price of one more h W product in the backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxTxV, targets_BxT) -> jax.Array:
  """Mean next-token cross-entropy (nats), computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def _check_linear_ce(h, w, targets, chunk_size, transpose_w):
  if h.ndim not in (2, 3):
    raise ValueError(f"linear_cross_entropy: `h` has shape {tuple(h.shape)}; expected [B, T, D] "
                     "or [N, D].")
  d = w.shape[1] if transpose_w else w.shape[0]
  if w.ndim != 2 or d != h.shape[-1]:
    raise ValueError(f"linear_cross_entropy: `w` has shape {tuple(w.shape)}; expected "
                     f"{'[V, D]' if transpose_w else '[D, V]'} with D = {h.shape[-1]} (h's last "
                     "axis).")
  if targets.shape != h.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"linear_cross_entropy: `targets` has shape {tuple(targets.shape)} and "
                     f"dtype {targets.dtype}; expected integer targets of shape "
                     f"{list(h.shape[:-1])} (h's leading axes).")
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
    raise ValueError(f"linear_cross_entropy: `chunk_size`={chunk_size!r}; expected a positive "
                     "int (tokens per chunk).")


def linear_cross_entropy(h, w, targets, *, multiplier: float = 1.0, chunk_size: int = 4096,
                         transpose_w: bool = False, compute_dtype=None) -> jax.Array:
  """Mean cross-entropy of logits = multiplier · h W over all tokens, without the logits.

  h: [B, T, D] (or [N, D], one row of N tokens), targets: [B, T] (or [N]). w: [D, V] (an LM
  head's kernel), or [V, D] with `transpose_w` (a tied embedding). Chunks are [B, t] slices of
  time with t = max(1, chunk_size // B) (about chunk_size tokens): the batch axis, the one a
  data-parallel mesh splits, stays whole in every chunk. Products run in `compute_dtype`
  (default: h's dtype) with float32 accumulation; the softmax is float32. Gradients flow to h and
  w (custom VJP, module docstring); `targets` gets none. T need not divide by t (the last chunk
  is padded and masked).
  """
  _check_linear_ce(h, w, targets, chunk_size, transpose_w)
  dtype = jnp.dtype(compute_dtype or h.dtype)
  if h.ndim == 2:
    return linear_cross_entropy(h[None], w, targets[None], multiplier=multiplier,
                                chunk_size=chunk_size, transpose_w=transpose_w,
                                compute_dtype=dtype)
  B, T, _ = h.shape
  return _linear_ce(h, w, targets, float(multiplier), max(1, min(T, chunk_size // B)),
                    bool(transpose_w), dtype)


def _chunks(x, t):
  """[B, T, ...] → [C, B, t, ...] (time chunks of length t, zero-padded at the end)."""
  B, T = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, -T % t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(B, -1, t, *x.shape[2:]), 1, 0)


def _unchunk(x, T):
  """[C, B, t, ...] → [B, T, ...] (the inverse of _chunks)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :T]


def _chunk_logits(h_c, w, multiplier, transpose_w, dtype):
  """z = multiplier · h_c W: [B, t, D] → [B, t, V], float32."""
  dims = (((2,), (1,)), ((), ())) if transpose_w else (((2,), (0,)), ((), ()))
  z = jax.lax.dot_general(h_c.astype(dtype), w, dims, preferred_element_type=jnp.float32)
  return z * multiplier if multiplier != 1.0 else z


def _forward(h, w, targets, multiplier, t, transpose_w, dtype):
  B, T, _ = h.shape
  w = w.astype(dtype)              # once, not per chunk
  valid = _chunks(jnp.ones((B, T), bool), t)

  def one(_, xs):
    h_c, y_c, ok_c = xs
    z = _chunk_logits(h_c, w, multiplier, transpose_w, dtype)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_y = jnp.take_along_axis(z, y_c[..., None], axis=-1)[..., 0]
    return None, (jnp.where(ok_c, lse - z_y, 0.0), lse)

  _, (losses, lse) = jax.lax.scan(one, None, (_chunks(h, t), _chunks(targets, t), valid))
  return losses.sum() / (B * T), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _linear_ce(h, w, targets, multiplier, t, transpose_w, dtype):
  return _forward(h, w, targets, multiplier, t, transpose_w, dtype)[0]


def _linear_ce_fwd(h, w, targets, multiplier, t, transpose_w, dtype):
  loss, lse = _forward(h, w, targets, multiplier, t, transpose_w, dtype)
  return loss, (h, w, targets, lse)


def _linear_ce_bwd(multiplier, t, transpose_w, dtype, res, g):
  h, w, targets, lse = res
  B, T, _ = h.shape
  scale = g / (B * T)
  valid = _chunks(jnp.ones((B, T), bool), t)
  w_c = w.astype(dtype)
  over_tokens = (((0, 1), (0, 1)), ((), ()))       # contract the chunk's [B, t] axes

  def one(dw, xs):
    h_c, y_c, lse_c, ok_c = xs
    z = _chunk_logits(h_c, w_c, multiplier, transpose_w, dtype)
    p = jnp.exp(z - lse_c[..., None])
    p = p - jax.nn.one_hot(y_c, z.shape[-1], dtype=p.dtype)
    dz = jnp.where(ok_c[..., None], p * (scale * multiplier), 0.0).astype(dtype)
    if transpose_w:   # z = h wᵀ: dh = dz w, dw = dzᵀ h
      dh_c = jnp.dot(dz, w_c, preferred_element_type=jnp.float32)
      dw = dw + jax.lax.dot_general(dz, h_c.astype(dtype), over_tokens,
                                    preferred_element_type=jnp.float32)
    else:             # z = h w: dh = dz wᵀ, dw = hᵀ dz
      dh_c = jax.lax.dot_general(dz, w_c, (((2,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
      dw = dw + jax.lax.dot_general(h_c.astype(dtype), dz, over_tokens,
                                    preferred_element_type=jnp.float32)
    return dw, dh_c.astype(h.dtype)

  dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32),
                        (_chunks(h, t), _chunks(targets, t), lse, valid))
  # targets are integers: their cotangent is float0.
  return _unchunk(dh, T), dw.astype(w.dtype), jnp.zeros(targets.shape, jax.dtypes.float0)


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)
