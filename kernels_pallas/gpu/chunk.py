"""The orchestrator: the GPU stages wired into one `jax.custom_vjp`, and the public entry point.

    forward    prep → walk_forward → output                  keeps the inputs, A, W, h_r, Ṽ
               (with walk_fwd_output the walk writes O: no output kernel, and a forward that
               is not differentiated writes no h_r, Ṽ)
                                                              (no W with walk_bwd_from_a; the
                                                              prep writes A alone with both
                                                              walk_*_from_a)
    backward   dv_local → walk_backward → grads (key, WY)   (no dv_local kernel with
                                                              walk_bwd_dv_local)

The stages are in `prep.py`, `walks.py`, `output.py` and `grads.py`; the math in the package docstring.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu import layout
from kernels_pallas.gpu.grads import grads
from kernels_pallas.gpu.output import dv_local, output
from kernels_pallas.gpu.prep import prep
from kernels_pallas.gpu.walks import walk_backward, walk_forward


def _forward(q, k, v, g, beta, reset_f, h0, *, scale, C, config, save=True):
  """Returns (O, final state, saved = (A, W, h_r, Ṽ)); `save=False` (a forward that is not
  differentiated) lets the walk skip h_r and Ṽ where it forms O itself (`walk_fwd_output`)."""
  reset_f = layout.zeros_if_none(reset_f, q)
  A, W, U = prep(q, k, v, g, beta, reset_f, C=C, config=config)
  tiles, values, walk_beta = (A, v, beta) if config.walk_fwd_from_a else (W, U, None)
  if config.walk_fwd_output:
    walk = walk_forward(tiles, values, k, g, reset_f, h0, config=config, beta=walk_beta, q=q,
                        scale=scale, o_dtype=v.dtype, save=save)
    o = walk.o
  else:
    walk = walk_forward(tiles, values, k, g, reset_f, h0, config=config, beta=walk_beta)
    o = output(q, k, v, g, reset_f, walk.states, walk.v_new, scale=scale, C=C, config=config)
  return o, walk.final, (A, None if config.walk_bwd_from_a else W, walk.states, walk.v_new)


def _backward(q, k, v, g, beta, reset_f, saved, do, dht, *, scale, C, config):
  """dṼ^local, the reverse walk (W as the forward stored it, or A and β), the gradients of the
  chunks."""
  A, W, hs, v_new = saved
  reset_f = layout.zeros_if_none(reset_f, q)
  dvl = None if config.walk_bwd_dv_local else dv_local(q, k, v, g, reset_f, do, scale=scale,
                                                        C=C, config=config)
  tiles, walk_beta = (A, beta) if W is None else (W, None)
  dh0, dhs, dv_new = walk_backward(tiles, k, q, g, reset_f, do, dvl, dht, scale=scale,
                                   config=config, beta=walk_beta)
  dq, dk, dv, dg, dbeta = grads(q, k, v, g, beta, reset_f, A, hs, v_new, do, dhs, dv_new,
                                scale=scale, C=C, config=config)
  return dq, dk, dv, dg, dbeta, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _gdn(q, k, v, g, beta, reset_f, h0, scale, C, config):
  o, ht, _ = _forward(q, k, v, g, beta, reset_f, h0, scale=scale, C=C, config=config, save=False)
  return o, ht


def _gdn_fwd(q, k, v, g, beta, reset_f, h0, scale, C, config):
  o, ht, saved = _forward(q, k, v, g, beta, reset_f, h0, scale=scale, C=C, config=config)
  return (o, ht), (q, k, v, g, beta, reset_f, saved)


def _gdn_bwd(scale, C, config, res, cts):
  q, k, v, g, beta, reset_f, saved = res
  do, dht = cts
  dq, dk, dv, dg, dbeta, dh0 = _backward(q, k, v, g, beta, reset_f, saved, do.astype(v.dtype),
                                         dht, scale=scale, C=C, config=config)
  dreset = None if reset_f is None else jnp.zeros_like(reset_f)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dreset, dh0)


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "config"))
def gated_delta_rule_gpu(q, k, v, g, beta, scale, h0, reset, chunk_size,
                         config: GpuConfig | None = None):
  """The `kernels_pallas.gated_delta_rule_pallas` contract on GPU (interpret mode on CPU).

  q, k: [B, T, Hk, K]; v: [B, T, H, V]; g, beta: [B, T, H] float32; scale: float; h0: [B, H, K, V]
  float32; reset: [B, T] bool or None; chunk_size: power of two in [16, 128]; config: launch
  settings (None: `GpuConfig()`, the measured defaults). scale, chunk_size and config are static:
  they key the jit cache, so another config compiles other kernels.
  Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32).
  """
  config = GpuConfig() if config is None else config
  T = q.shape[1]
  C = int(chunk_size)
  N = -(-T // C)
  pad = N * C - T

  def padded(x):  # padding tokens (g = β = k = v = 0) leave the state unchanged
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x

  q, k, v = padded(q), padded(k), padded(v)
  g, beta = padded(g.astype(jnp.float32)), padded(beta.astype(jnp.float32))
  reset_f = None if reset is None else padded(reset.astype(jnp.float32))
  o, ht = _gdn(q, k, v, g, beta, reset_f, h0.astype(jnp.float32), float(scale), C, config)
  return o[:, :T], ht
