"""Independent float64 NumPy references for the gated delta rule (token by token) and the short
conv with SiLU.

Written from the math alone, sharing no code with `gdn_jax`:
    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = scale · S_tᵀ q_t
q/k head of value head h is h // (H / Hk) (fla's `repeat(..., '(h g)')` order).
A new segment (segment_ids[t] != segment_ids[t−1]) starts from a zero state.

    y_t = SiLU(z_t),  z_t = Σ_{i<W} w_i ⊙ x_{t−(W−1)+i}   over the taps inside the sequence whose
                                                           segment id is t's
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


def _conv_taps(T, W, segment_ids, b):
  """[(t, i, s)]: output t reads input s = t − (W−1) + i through tap i (inside the sequence and,
  with segment ids, the same document)."""
  return [(t, i, t - (W - 1) + i) for t in range(T) for i in range(W)
          if t - (W - 1) + i >= 0 and (segment_ids is None
                                       or segment_ids[b, t - (W - 1) + i] == segment_ids[b, t])]


def short_conv_ref(x, w, segment_ids=None):
  """(y, z) [B, T, C] in float64 for x [B, T, C], w [W, C] (zeros before t = 0)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  B, T, _ = x.shape
  z = np.zeros_like(x)
  for b in range(B):
    for t, i, s in _conv_taps(T, w.shape[0], segment_ids, b):
      z[b, t] += w[i] * x[b, s]
  return z / (1 + np.exp(-z)), z


def short_conv_grads_ref(x, w, dy, segment_ids=None):
  """(dx, dw) of Σ dy ⊙ y, float64: dz = dy σ(z) (1 + z (1 − σ(z))), dx_s = Σ w_i dz_t and
  dw_i = Σ x_s dz_t over the taps (t, i, s)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  _, z = short_conv_ref(x, w, segment_ids)
  sig = 1 / (1 + np.exp(-z))
  dz = np.asarray(dy, np.float64) * sig * (1 + z * (1 - sig))
  dx, dw = np.zeros_like(x), np.zeros_like(w)
  for b in range(x.shape[0]):
    for t, i, s in _conv_taps(x.shape[1], w.shape[0], segment_ids, b):
      dx[b, s] += w[i] * dz[b, t]
      dw[i] += x[b, s] * dz[b, t]
  return dx, dw
