"""Curvature of the loss along chosen parameters: Hessian- and Gauss-Newton-vector products and
their extreme eigenvalues by Lanczos (the SGD stability-edge study of docs/mup.md).

For a loss L(θ) = mean over N tokens of ℓ(z_t(θ)), with logits z and softmax cross-entropy ℓ:

    Hessian       H v = d/dε ∇L(θ + ε v)                        (forward-over-reverse)
    Gauss-Newton  G v = Jᵀ H_ℓ J v,   J = ∂z/∂θ,   (H_ℓ u)_t = (p_t ⊙ u_t − p_t (p_tᵀ u_t)) / N

with p_t = softmax(z_t). H = G + (1/N) Σ_t Σ_c (p_tc − y_tc) ∇²z_tc: what G leaves out is the
network's own second derivative, weighted by the residual p − y. G is positive semi-definite; H
need not be. Gradient descent with momentum μ on a quadratic is stable while lr · λ < 2 (1 + μ)
for every eigenvalue λ of the (LR-preconditioned) Hessian, so the largest *positive* eigenvalue
sets the edge; `lanczos` finds both ends of the spectrum, the positive and the negative one.

All functions take the parameters as a pytree and return pytrees of the same structure, so
callers restrict the study to a subset (e.g. one layer's W_q, W_k) by closing over the rest.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

PyTree = object


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """H v for the Hessian H of the scalar `loss_fn` at `params`."""
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def ggn_vp(logits_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """G v for the Gauss-Newton matrix of the mean softmax cross-entropy of `logits_fn(params)`
  ([..., vocab]; the mean runs over all leading axes, as in `gdn_jax.loss.cross_entropy`)."""
  logits, jv = jax.jvp(logits_fn, (params,), (v,))
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  jv = jv.astype(jnp.float32)
  num_tokens = logits.size // logits.shape[-1]
  h_jv = (p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)) / num_tokens
  _, pullback = jax.vjp(logits_fn, params)
  return pullback(h_jv.astype(logits.dtype))[0]


def lanczos(matvec: Callable[[PyTree], PyTree], v0: PyTree, *, steps: int = 30
            ) -> tuple[np.ndarray, PyTree]:
  """Ritz values (ascending) of the symmetric operator `matvec` after `steps` Lanczos steps from
  `v0`, and the unit Ritz vector of the largest (most positive) one.

  Lanczos builds an orthonormal basis Q of the Krylov space {v0, A v0, …, A^(k−1) v0} in which
  A is tridiagonal, T = Qᵀ A Q (diagonal α, off-diagonal β); T's eigenvalues approximate A's
  extreme eigenvalues at both ends, the positive and the negative one, far faster than power
  iteration. Every new vector is re-orthogonalised against all previous ones (float64), which
  keeps ghost copies of converged eigenvalues out at these small k. Stops early when the Krylov
  space is invariant (β below 100 ulp of |A q| in the operator's dtype): T is then exact.
  """
  if steps < 1:
    raise ValueError(f"`steps`={steps}; expected ≥ 1 Lanczos steps.")
  flat0, unravel = ravel_pytree(v0)
  q = np.asarray(flat0, np.float64)
  norm = np.linalg.norm(q)
  if not norm > 0:
    raise ValueError("`v0` is zero; expected a start vector with a component along the "
                     "eigenvectors of interest, e.g. a random one.")
  dtype = flat0.dtype
  op = lambda x: np.asarray(ravel_pytree(matvec(unravel(jnp.asarray(x, dtype))))[0], np.float64)
  basis, alpha, beta = [q / norm], [], []
  for k in range(min(steps, q.size)):
    w = op(basis[k])
    size = float(np.linalg.norm(w))
    alpha.append(float(basis[k] @ w))
    for b in basis:                        # full re-orthogonalisation (includes the 3-term step)
      w -= (b @ w) * b
    b_next = float(np.linalg.norm(w))
    if k + 1 == min(steps, q.size) or b_next <= 100 * np.finfo(dtype).eps * size:
      break
    beta.append(b_next)
    basis.append(w / b_next)
  t = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
  values, vectors = np.linalg.eigh(t)
  top = np.stack(basis[:len(alpha)], axis=1) @ vectors[:, -1]
  return values, unravel(jnp.asarray(top / np.linalg.norm(top), dtype))
