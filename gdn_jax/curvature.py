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
does that for one GDN layer's W_q, W_k, `qk_head_curvatures` for each of its q/k heads alone.
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


def _layer_qk(params, layer: int):
  """({"q_proj", "k_proj"}: block `layer`'s W_q, W_k kernels [d, Hk·K], with_qk): with_qk(ws)
  is the full parameter State with those two replaced by ws."""
  num_layers = len(params["blocks"])
  if not 0 <= layer < num_layers:
    raise ValueError(f"`layer`={layer}; expected a block index in [0, {num_layers}).")
  leaves, treedef = jax.tree.flatten(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  index = {name: paths.index(f"['blocks'][{layer}]['mixer']['{name}']['kernel'].value")
           for name in ("q_proj", "k_proj")}

  def with_qk(ws):
    new = list(leaves)
    for name, i in index.items():
      new[i] = ws[name]
    return jax.tree.unflatten(treedef, new)
  return {name: leaves[i] for name, i in index.items()}, with_qk


def qk_head_curvatures(graphdef, params, rest, *, layer: int, tokens, head_k_dim: int,
                       lanczos_steps: int = 20, seed: int = 0) -> np.ndarray:
  """[Hk]: λ_max of the Hessian of the LM loss on `tokens` restricted to one q/k head of block
  `layer`, i.e. to that head's K columns of W_q and of W_k (every other weight, the layer's
  other heads included, fixed). Each is the top eigenvalue of a principal block of
  `qk_layer_curvature`'s H, so by Cauchy interlacing none exceeds H's λ_max; when H's top
  eigenvector sits on one head (docs/mup.md), its λ_max is close to the largest of these.
  One compiled Hessian-vector product serves every head (the head index is traced)."""
  qk, with_qk = _layer_qk(params, layer)
  d, width = qk["q_proj"].shape
  num_heads = width // head_k_dim

  def loss_fn(block, head):   # block: head `head`'s {"q_proj", "k_proj"} columns [d, K]
    ws = {n: jax.lax.dynamic_update_slice(w, block[n], (0, head * head_k_dim))
          for n, w in qk.items()}
    logits = nnx.merge(graphdef, with_qk(ws), rest)(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:])

  def head_block(head):
    return {n: jax.lax.dynamic_slice(w, (0, head * head_k_dim), (d, head_k_dim))
            for n, w in qk.items()}
  matvec = jax.jit(lambda v, head: hvp(lambda b: loss_fn(b, head), head_block(head), v))
  tops = []
  for head in range(num_heads):
    v0 = {n: jax.random.normal(jax.random.fold_in(jax.random.key(seed), head), (d, head_k_dim))
          for n in qk}
    values, _ = lanczos(lambda v, h=jnp.int32(head): matvec(v, h), v0, steps=lanczos_steps)
    tops.append(values[-1])
  return np.asarray(tops, np.float64)


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
  qk, with_qk = _layer_qk(params, layer)
  mixer = params["blocks"][layer]["mixer"]
  num_heads = qk["q_proj"].shape[1] // head_k_dim
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


def head_summary(runs: list[dict], samples: int = 20000, seed: int = 0) -> dict:
  """Per layer and width, the per-head λ_max pooled over seeds (median, 90th percentile, max) and
  the whole block's λ_max (median over seeds); and the extreme-value test of docs/mup.md: if the
  heads' curvatures were i.i.d. draws of one width-independent law, the widest width's pooled
  heads predict the block's growth from the narrowest head count to the widest one as
  log2 E[max of H_wide draws] / E[max of H_narrow draws] (resampled), to set against the growth
  of the per-head median (the alternative: every head's own curvature grows with d)."""
  rng = np.random.default_rng(seed)
  out = {}
  widths = sorted({r["width"] for r in runs if "head_h_max" in next(iter(r["layers"].values()))})
  if not widths:
    return out
  for layer in sorted({k for r in runs for k in r["layers"]}):
    per_width, pooled = {}, {}
    for w in widths:
      rs = [r for r in runs if r["width"] == w]
      heads = pooled[w] = np.concatenate([r["layers"][layer]["head_h_max"] for r in rs])
      per_width[w] = dict(heads=rs[0]["heads"], n=len(heads), median=float(np.median(heads)),
                          p90=float(np.percentile(heads, 90)), max=float(heads.max()),
                          block_h_max=float(np.median([r["layers"][layer]["h_max"] for r in rs])))
    entry = dict(per_width=per_width)
    if len(widths) > 1:
      lo, hi = per_width[widths[0]], per_width[widths[-1]]
      pool = pooled[widths[-1]]
      emax = lambda h: float(np.mean(rng.choice(pool, (samples, h)).max(axis=1)))
      entry.update(
          predicted_block_growth_log2=float(np.log2(emax(hi["heads"]) / emax(lo["heads"]))),
          measured_block_growth_log2=float(np.log2(hi["block_h_max"] / lo["block_h_max"])),
          median_head_growth_log2=float(np.log2(hi["median"] / lo["median"])))
    out[layer] = entry
  return out
