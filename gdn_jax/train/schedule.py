"""The learning-rate schedule: the one that training, sweeps and studies all use.

    lr(step) = peak · factor(step)
    factor   = (step + 1) / warmup                               step < warmup
             = f + (1 − f) · ½ (1 + cos(π s))                     cosine,   s = progress after warmup
             = 1 − (1 − f) · s                                    linear
             = 1                                                  constant

`step` counts the updates done before this one (the first update has step 0), f is
`final_fraction` and s = min(1, (step − warmup) / (num_steps − warmup)).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

KINDS = ("cosine", "linear", "constant")


def lr_factor(step, *, num_steps: int, warmup_steps: int, final_fraction: float,
              kind: str = "cosine"):
  """factor(step) above, as a float32 array (jit- and vmap-friendly)."""
  if kind not in KINDS:
    raise ValueError(f"lr_factor: `kind`={kind!r}; expected one of {KINDS}.")
  step = jnp.asarray(step, jnp.float32)
  warm = (step + 1) / max(warmup_steps, 1)
  s = jnp.clip((step - warmup_steps) / max(num_steps - warmup_steps, 1), 0.0, 1.0)
  if kind == "cosine":
    after = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(math.pi * s))
  elif kind == "linear":
    after = 1 - (1 - final_fraction) * s
  else:
    after = jnp.ones_like(s)
  return jnp.where(step < warmup_steps, warm, after)
