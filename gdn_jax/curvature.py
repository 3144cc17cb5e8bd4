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

`hvp`, `ggn_vp` and `lanczos` take the parameters as a pytree and return pytrees of the same
structure, so callers restrict a study to a subset by closing over the rest; `qk_layer_curvature`
does that for one GDN layer's W_q, W_k.
"""
from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from gdn_jax.loss import cross_entropy

PyTree = object


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """H v for the Hessian H of the scalar `loss_fn` at `params`."""
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def ggn_vp(logits_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """G v for the Gauss-Newton matrix of the mean softmax cross-entropy of `logits_fn(params)`
  ([..., vocab]; the mean runs over all leading axes, as in `gdn_jax.loss.cross_entropy`)."""
  logits, jvp_fn = jax.linearize(logits_fn, params)     # one forward pass serves J and Jᵀ
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  jv = jvp_fn(v).astype(jnp.float32)
  num_tokens = logits.size // logits.shape[-1]
  h_jv = (p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)) / num_tokens
  return jax.linear_transpose(jvp_fn, params)(h_jv.astype(logits.dtype))[0]


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


def qk_layer_curvature(graphdef, params, rest, *, layer: int, tokens, head_k_dim: int,
                       lanczos_steps: int = 30, seed: int = 0) -> dict:
  """Curvature of the LM loss on `tokens` ([B, T + 1]) in (W_q, W_k) of block `layer` of an
  `nnx.split(model, nnx.Param, ...)` GatedDeltaNetLM, every other weight fixed.

  Returns λ_max and λ_min of that Hessian block H and λ_max of its Gauss-Newton part G (Lanczos
  from a random start drawn with `seed`), and for H's top eigenvector: the share of its squared
  norm on the largest q/k head (that head's W_q and W_k columns together), the participation
  ratio 1 / Σ share² over heads, and that head's rank among the layer's q/k heads by decay rate
  exp(A_log)·softplus(dt_bias) (the gate's data-independent part, slowest of the head's value
  heads; 0 = slowest) and by gradient norm (0 = largest). Needs a model whose rule supports
  forward-mode autodiff (`rule_impl="recurrent"`; the chunked rule's custom VJP does not).
  """
  num_layers = len(params["blocks"])
  if not 0 <= layer < num_layers:
    raise ValueError(f"`layer`={layer}; expected a block index in [0, {num_layers}).")
  mixer = params["blocks"][layer]["mixer"]
  leaves, treedef = jax.tree.flatten(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  index = {name: paths.index(f"['blocks'][{layer}]['mixer']['{name}']['kernel'].value")
           for name in ("q_proj", "k_proj")}
  qk = {name: leaves[i] for name, i in index.items()}
  num_heads = qk["q_proj"].shape[1] // head_k_dim

  def with_qk(ws):          # the full parameter State with this layer's W_q, W_k replaced
    new = list(leaves)
    for name, i in index.items():
      new[i] = ws[name]
    return jax.tree.unflatten(treedef, new)

  logits_fn = lambda ws: nnx.merge(graphdef, with_qk(ws), rest)(tokens[:, :-1])
  loss_fn = lambda ws: cross_entropy(logits_fn(ws), tokens[:, 1:])
  v0 = {n: jax.random.normal(jax.random.key(seed), w.shape) for n, w in qk.items()}
  h_values, top = lanczos(jax.jit(lambda v: hvp(loss_fn, qk, v)), v0, steps=lanczos_steps)
  g_values, _ = lanczos(jax.jit(lambda v: ggn_vp(logits_fn, qk, v)), v0, steps=lanczos_steps)

  def per_head(tree):       # [heads]: squared norm of each head's q and k columns together
    return sum(np.square(np.asarray(x, np.float64).reshape(-1, num_heads, head_k_dim)).sum((0, 2))
               for x in tree.values())
  mass = per_head(top)
  mass = mass / mass.sum()
  head = int(np.argmax(mass))
  rate = (np.exp(np.asarray(mixer["A_log"][...], np.float64))
          * np.asarray(jax.nn.softplus(mixer["dt_bias"][...]), np.float64))
  rate = rate.reshape(num_heads, -1).min(axis=1)     # value heads i use q/k head i // group
  grad_norm = per_head(jax.grad(loss_fn)(qk)) ** 0.5
  rank = lambda x: int(np.argsort(np.argsort(x))[head])
  return dict(h_max=float(h_values[-1]), h_min=float(h_values[0]), g_max=float(g_values[-1]),
              top_head_share=float(mass[head]), participation=float(1 / np.sum(mass ** 2)),
              top_head_decay_rank=rank(rate), top_head_grad_rank=rank(-grad_norm))
