"""An independent float64 NumPy reference for the gated delta rule (token by token).

Written from the math alone, sharing no code with `gdn_jax`:
    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t
q/k head of value head h is h // (H / Hk) (fla's `repeat(..., '(h g)')` order).
A new segment (segment_ids[t] != segment_ids[t−1]) starts from a zero state.
"""
import numpy as np


def gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None,
                         use_qk_l2norm=False, segment_ids=None, qk_norm_eps=1e-6):
  q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
  B, T, Hk, K = q.shape
  H, V = v.shape[2], v.shape[3]
  group = H // Hk
  if scale is None:
    scale = K ** -0.5
  if use_qk_l2norm:
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + qk_norm_eps)
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + qk_norm_eps)
  S = np.zeros((B, H, K, V)) if initial_state is None else np.array(initial_state, np.float64)
  o = np.zeros((B, T, H, V))
  for b in range(B):
    for t in range(T):
      if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
        S[b] = 0.0
      for h in range(H):
        kt, qt = k[b, t, h // group], q[b, t, h // group]
        transition = np.exp(g[b, t, h]) * (np.eye(K) - beta[b, t, h] * np.outer(kt, kt))
        S[b, h] = transition @ S[b, h] + beta[b, t, h] * np.outer(kt, v[b, t, h])
        o[b, t, h] = scale * S[b, h].T @ qt
  return o, S
