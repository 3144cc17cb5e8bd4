"""Flax NNX layers of a Gated DeltaNet LM: Linear, Embed, RMSNorm, GatedRMSNorm, ShortConv,
the GatedDeltaNet token mixer and the SwiGLU MLP.

(Over 400 lines on purpose: the GDN mixer's full-sequence path and its single-token decode path
share parameters and caches, and are kept side by side so that a change to one is seen next to
the other; tests/model_test.py and tests/generate_test.py check that they agree.)

μP labels. Every `nnx.Param` carries these metadata fields that `gdn_jax.mup` reads:

    fan_in_axes   axes whose sizes multiply to the parameter's fan-in  (() means fan-in 1)
    fan_out_axes  axes whose sizes multiply to its fan-out
    weight_decay  whether AdamW/SGD weight decay may touch it (matrices yes; gains, conv
                  filters, A_log, dt_bias no)
    role          what the parameter is, where fans alone cannot tell (one of ROLES): the
                  paper's recipe treats the gate projections W_a, W_b and the gate scalars
                  A_log, dt_bias apart from other matrices and vectors; the project's μP SGD
                  table treats W_q, W_k ("qk_proj": they feed the q/k L2 norms) apart;
                  "attention" marks the projections of a hybrid model's softmax attention
                  (gdn_jax.attention), for which the paper's recipe has no rule
    init_std      the std of its zero-mean normal init draw (None for other inits: gains of 1,
                  A_log, dt_bias), so a parametrization can rescale the draw to any std

e.g. a Linear kernel [in, out] is `fan_in_axes=(0,), fan_out_axes=(1,)`, an RMSNorm gain [D] is
`fan_in_axes=(), fan_out_axes=(0,)`. μP compares these fan sizes with those of a base model to
classify the parameter (input-like, hidden, output-like, scalar); see docs/mup.md.

Forward multipliers live in the modules as plain Python floats (static, part of the graph
definition): `Linear.multiplier`, `Embed.multiplier` / `Embed.attend_multiplier` and
`GatedDeltaNet.qk_scale`. They are 1 (resp. K^-1/2) unless `gdn_jax.mup.build_model` sets them.

Coordinate check. Modules with a `record` attribute sow their intermediate activations as
`nnx.Intermediate` when `record` is True (off by default, so training never accumulates them).
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gdn_jax.ops import gated_delta_rule, sharded


ROLES = ("embedding", "matrix", "qk_proj", "readout", "conv", "norm", "gate_proj",
         "gate_scalar", "attention")


def param(value, *, fan_in_axes: tuple[int, ...], fan_out_axes: tuple[int, ...],
          weight_decay: bool, role: str, init_std: float | None = None) -> nnx.Param:
  """An `nnx.Param` with the μP labels (see the module docstring)."""
  if role not in ROLES:
    raise ValueError(f"param: `role`={role!r}; expected one of {ROLES}.")
  return nnx.Param(value, fan_in_axes=tuple(fan_in_axes), fan_out_axes=tuple(fan_out_axes),
                   weight_decay=weight_decay, role=role, init_std=init_std)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype):
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = multiplier · x W, W: [in, out], no bias, W ~ N(0, init_std²)."""

  def __init__(self, in_features: int, out_features: int, *, init_std: float, dtype,
               param_dtype, rngs: nnx.Rngs, role: str = "matrix"):
    self.kernel = param(_normal(rngs, (in_features, out_features), init_std, param_dtype),
                        fan_in_axes=(0,), fan_out_axes=(1,), weight_decay=True, role=role,
                        init_std=init_std)
    self.dtype = dtype
    self.multiplier = 1.0

  def __call__(self, x_BxTxI):
    y = jnp.dot(x_BxTxI.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.multiplier == 1.0 else y * jnp.asarray(self.multiplier, self.dtype)


def stacked_kernel(linears, dtype):
  """[W_1 | W_2 | …]: the Linears' kernels side by side [in, Σ out_i], in `dtype`."""
  return jnp.concatenate([lin.kernel[...].astype(dtype) for lin in linears], axis=1)


def scale_columns(y, linears):
  """y [..., Σ out_i], a product with `stacked_kernel(linears)`, with each Linear's forward
  multiplier on its own columns (what `Linear.__call__` applies to its output)."""
  if all(lin.multiplier == 1.0 for lin in linears):
    return y
  m = jnp.concatenate([jnp.full((lin.kernel.shape[1],), lin.multiplier, y.dtype)
                       for lin in linears])
  return y * jnp.pad(m, (0, y.shape[-1] - m.shape[0]), constant_values=1)   # padded columns


def fused_linears(x, linears, dtype, column_multiple: int = 128) -> list:
  """[lin(x) for lin in linears] as one product x [W_1 | W_2 | …]: one GEMM (and one for dx, one
  for the weights' gradient in the backward) instead of one per Linear. Each output is its
  columns of the product times its Linear's multiplier, as `Linear.__call__` computes it; the
  parameters stay separate (their μP labels, groups and checkpoints do not change).

  The stacked kernel gets zero columns up to a multiple of `column_multiple`, whose outputs are
  dropped: GDN's q | k | v | g | a | b is 9228 columns in the 512M model (a, b: one per head), and
  a bf16 matrix whose rows are not a multiple of 8 elements is off the GEMM libraries' aligned
  paths (experiments/NOTES_train.md)."""
  w = stacked_kernel(linears, dtype)
  pad = -w.shape[1] % column_multiple
  y = jnp.dot(x.astype(dtype), jnp.pad(w, ((0, 0), (0, pad))) if pad else w)
  ends = list(itertools.accumulate(lin.kernel.shape[1] for lin in linears))
  parts = jnp.split(y, ends, axis=-1)[:len(linears)]
  return [part if lin.multiplier == 1.0 else part * jnp.asarray(lin.multiplier, part.dtype)
          for part, lin in zip(parts, linears)]


class Embed(nnx.Module):
  """Token embedding E: [V, D] (fan-in = vocabulary, fan-out = width), E ~ N(0, init_std²).

  `attend` is the tied read-out logits = attend_multiplier · h Eᵀ.
  """

  def __init__(self, num_embeddings: int, features: int, *, init_std: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.embedding = param(_normal(rngs, (num_embeddings, features), init_std, param_dtype),
                           fan_in_axes=(0,), fan_out_axes=(1,), weight_decay=True,
                           role="embedding", init_std=init_std)
    self.dtype = dtype
    self.multiplier = 1.0
    self.attend_multiplier = 1.0

  def __call__(self, tokens_BxT):
    x = jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype)
    return x if self.multiplier == 1.0 else x * jnp.asarray(self.multiplier, self.dtype)

  def attend(self, h_BxTxD):
    logits = jnp.dot(h_BxTxD.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
    return logits if self.attend_multiplier == 1.0 else logits * self.attend_multiplier


def rms_normalize(x, eps: float):
  """x / sqrt(mean(x²) + eps) over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · w, with a learned gain w (init 1) over the last axis."""

  def __init__(self, features: int, *, eps: float, dtype, param_dtype):
    self.weight = param(jnp.ones((features,), param_dtype), fan_in_axes=(), fan_out_axes=(0,),
                        weight_decay=False, role="norm")
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    return (rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
  """Output norm of the GDN mixer: y = RMSNorm_V(o) · w · SiLU(gate), per value head.

  The gain w: [V] is shared by all value heads (as in fla). The norm makes the mixer output
  invariant to the scale of o, *as long as mean(o²) ≫ eps* (the eps regime, docs/mup.md).
  """

  def __init__(self, features: int, *, eps: float, dtype, param_dtype):
    self.weight = param(jnp.ones((features,), param_dtype), fan_in_axes=(), fan_out_axes=(0,),
                        weight_decay=False, role="norm")
    self.eps = eps
    self.dtype = dtype

  def __call__(self, o_BxTxHxV, gate_BxTxHxV=None):
    y = rms_normalize(o_BxTxHxV, self.eps) * self.weight[...].astype(jnp.float32)
    if gate_BxTxHxV is not None:
      y = y * jax.nn.silu(gate_BxTxHxV.astype(jnp.float32))
    return y.astype(self.dtype)


class ShortConv(nnx.Module):
  """Causal depthwise convolution over time (no bias) followed by SiLU.

      y_t = SiLU( Σ_{i<W} w_i ⊙ x_{t−(W−1)+i} ),   w: [W, C],

  where inputs before the sequence come from the decode cache (the last W−1 inputs, zeros for a
  fresh sequence), and inputs from another packed document (different segment id) count as 0.
  w ~ N(0, 1/W): variance-preserving over the W taps (fla's N(0, 0.02) would shrink v by ~50×
  and push the output RMSNorm into its eps regime at small widths).

  `impl` (ModelConfig.conv_impl): "xla", the taps as XLA ops; "pallas", a call without a conv
  state (training) runs `kernels_pallas.short_conv` (Triton; the interpreter off GPUs), whose
  backward makes dz, then dx and dw (two passes). A call with a state (prefill from a cache) stays
  XLA.
  """

  def __init__(self, channels: int, conv_size: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               impl: str = "xla"):
    self.weight = param(_normal(rngs, (conv_size, channels), conv_size ** -0.5, param_dtype),
                        fan_in_axes=(0,), fan_out_axes=(1,), weight_decay=False, role="conv",
                        init_std=conv_size ** -0.5)
    self.conv_size = conv_size
    self.dtype = dtype
    self.impl = impl

  def init_state(self, batch: int):
    return jnp.zeros((batch, self.conv_size - 1, self.weight.shape[1]), self.dtype)

  def __call__(self, x_BxTxC, segment_ids_BxT=None, state_BxWxC=None):
    """Returns (y [B, T, C], new state [B, W−1, C]: the last W−1 inputs of the last document)."""
    B, T, C = x_BxTxC.shape
    W = self.conv_size
    x = x_BxTxC.astype(self.dtype)
    w_WxC = self.weight[...].astype(self.dtype)
    if self.impl == "pallas" and state_BxWxC is None:
      return self._pallas(x, w_WxC, segment_ids_BxT)
    state = self.init_state(B) if state_BxWxC is None else state_BxWxC.astype(self.dtype)
    xp_BxPxC = jnp.concatenate([state, x], axis=1)                 # P = T + W − 1
    if segment_ids_BxT is not None:  # the cached inputs continue the first document
      seg_BxP = jnp.concatenate(
          [jnp.repeat(segment_ids_BxT[:, :1], W - 1, axis=1), segment_ids_BxT], axis=1)
    y = jnp.zeros((B, T, C), jnp.float32)
    for i in range(W):
      x_i = xp_BxPxC[:, i:i + T]
      if segment_ids_BxT is not None:
        x_i = jnp.where((seg_BxP[:, i:i + T] == segment_ids_BxT)[..., None], x_i, 0)
      y = y + x_i.astype(jnp.float32) * w_WxC[i].astype(jnp.float32)
    return jax.nn.silu(y).astype(self.dtype), _conv_state_after(state, x, segment_ids_BxT)

  def _pallas(self, x_BxTxC, w_WxC, segment_ids_BxT):
    """`__call__` without a conv state through `kernels_pallas.short_conv` (same outputs)."""
    from kernels_pallas.short_conv import short_conv_silu  # pylint: disable=import-outside-toplevel
    if sharded.mapped_mesh() is not None:
      raise ValueError("ShortConv: conv_impl='pallas' runs one kernel over the whole batch (no "
                       "per-device mapping yet) and would gather its operands under the mesh "
                       f"{dict(jax.sharding.get_abstract_mesh().shape)}; use conv_impl='xla' "
                       "there.")
    y = short_conv_silu(x_BxTxC, w_WxC, segment_ids_BxT)
    state = self.init_state(x_BxTxC.shape[0])
    return y, _conv_state_after(state, x_BxTxC, segment_ids_BxT)

  def step(self, x_BxC, state_BxWxC):
    """One token: window = [state, x]; returns (y [B, C], window without its oldest input)."""
    return short_conv_step(x_BxC, state_BxWxC.astype(self.dtype),
                           self.weight[...].astype(self.dtype))


def _conv_state_after(state_BxWxC, x_BxTxC, segment_ids_BxT):
  """The conv state after x: the last W−1 inputs of [state, x], zeroed where they belong to
  another document than x's last token (the state continues x's first document)."""
  T, keep = x_BxTxC.shape[1], min(x_BxTxC.shape[1], state_BxWxC.shape[1])   # x's rows kept
  tail = jnp.concatenate([state_BxWxC, x_BxTxC[:, T - keep:]], axis=1)[:, keep:]
  if segment_ids_BxT is None:
    return tail
  seg = jnp.concatenate([jnp.repeat(segment_ids_BxT[:, :1], state_BxWxC.shape[1], axis=1),
                         segment_ids_BxT[:, T - keep:]], axis=1)[:, keep:]
  return jnp.where((seg == segment_ids_BxT[:, -1:])[..., None], tail, 0)


def decode_dot(x_BxD, w, matmul_rows: int = 1, *, w_contract: int = 0, decode_config=None,
               product: str | None = None):
  """x @ w (w [D, N]), or x @ wᵀ (w [N, D], `w_contract`=1: a tied read-out, no transpose made),
  for a decode step, with the batch padded by zero rows to at least `matmul_rows`.

  Exact (the padded rows are sliced off). At batch 1 XLA's GPU compiler lowers a 1 × D by D × N
  product to a reduction fusion rather than a GEMM (experiments/NOTES_decode.md); padding to 8
  or 16 rows is the cheap way to ask for a GEMM instead. 1 = no padding.
  Where `decode_config` (kernels_pallas.config.DecodeConfig; None: its defaults) says so
  (`use_gemv`: by default batch 1 on GPUs; `gemv=True`: batches ≤ 8), the product runs in the
  Pallas GEMV kernel instead (float32 sums, the result in x's dtype as XLA's product gives),
  launched with `product`'s settings (`DecodeConfig.gemv_launch_for`: "in_proj", "out_proj",
  "mlp_in", "mlp_out", "head"; None: the global `gemv_launch`).
  """
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  B = x_BxD.shape[0]
  decode_config = DecodeConfig.or_default(decode_config)
  if decode_config.use_gemv(B, contract_dim=x_BxD.shape[1]):
    from kernels_pallas import decode_gemv  # pylint: disable=import-outside-toplevel
    y = decode_gemv.gemv_pallas(x_BxD, w, transposed=w_contract == 1,
                                **decode_config.gemv_launch_for(product))
    return y.astype(jnp.result_type(x_BxD, w))
  x = x_BxD if B >= matmul_rows else jnp.pad(x_BxD, ((0, matmul_rows - B), (0, 0)))
  if w_contract == 0:
    y = jnp.dot(x, w)
  else:
    y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
  return y if B >= matmul_rows else y[:B]


def mosaic_launch(decode_config, product: str, K: int, N: int) -> dict | None:
  """The tile and split keyword arguments of `kernels_pallas.decode_gemv_mgpu`'s kernels for a
  batch-1 [K, N] product, where `DecodeConfig.gemv_backend` is "mosaic" and they take its shape
  (N a multiple of `product`'s block_n in [64, 256], K tiles of ≥ 64 rows); else None (the
  Triton GEMV)."""
  from kernels_pallas import decode_gemv  # pylint: disable=import-outside-toplevel
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  cfg = DecodeConfig.or_default(decode_config)
  if cfg.gemv_backend != "mosaic":
    return None
  launch = cfg.gemv_launch_for(product)
  bn, bk = launch["block_n"], min(launch["block_k"], 256)     # a TMA box: ≤ 256 per dimension
  if N % bn or not 64 <= bn <= 256 or decode_gemv.block_k_for(K, bk) < 64:
    return None
  return dict(block_n=bn, block_k=bk, min_programs=launch["min_programs"])


def decode_norm_dot(x_1xD, w, norm, addends_SxD=None, *, addend_multiplier: float = 1.0,
                    w_contract: int = 0, sum_splits: bool = True, zeros_out: int = 0,
                    decode_config=None, product: str | None = None):
  """(norm(r) @ w, r) at batch 1 as one GEMV kernel whose prologue makes the residual stream
  r = x + rnd(m · Σ_i addends[i]) (None: r = x) and the RMSNorm `norm` (its gain and eps):
  `decode_gemv.gemv_norm_pallas`, the same roundings as `decode_dot(norm(r), w)` after an XLA
  add. The caller checks `DecodeConfig.use_gemv_norm` and that x, the norm and w share a dtype.
  Returns y in that dtype ([1, N]), or with `sum_splits=False` its float32 split partials
  [S, 1, N]; and r [1, D]; with `zeros_out` Z > 0 also float32 zeros [1, Z] made by the kernel
  (a later GEMV's `accumulator`). `product`: whose GEMV settings (`decode_dot`). With
  `DecodeConfig.gemv_backend` "mosaic" the kernel is `decode_gemv_mgpu.gemv_norm_mgpu` where it
  takes the product (`mosaic_launch`; not with `zeros_out` or a transposed w)."""
  from kernels_pallas import decode_gemv  # pylint: disable=import-outside-toplevel
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  cfg = DecodeConfig.or_default(decode_config)
  mosaic = (None if zeros_out or w_contract or x_1xD.dtype != w.dtype
            else mosaic_launch(cfg, product, *w.shape))
  if mosaic is not None:
    from kernels_pallas import decode_gemv_mgpu  # pylint: disable=import-outside-toplevel
    y, r = decode_gemv_mgpu.gemv_norm_mgpu(
        x_1xD, w, norm.weight[...], addends_SxD, eps=float(norm.eps),
        addend_multiplier=float(addend_multiplier), **mosaic)
    if sum_splits:
      y = decode_gemv.split_sum(y).astype(jnp.result_type(norm.dtype, w))
    return y, r
  y, r, *zeros = decode_gemv.gemv_norm_pallas(
      x_1xD, w, norm.weight[...], addends_SxD, eps=float(norm.eps),
      addend_multiplier=float(addend_multiplier), transposed=w_contract == 1,
      sum_splits=sum_splits, zeros_out=zeros_out, **cfg.gemv_launch_for(product))
  return ((y.astype(jnp.result_type(norm.dtype, w)) if sum_splits else y), r, *zeros)


def decode_swiglu(x_BxD, w_gate_up, w_down, gate_up_linears, matmul_rows: int = 1, *,
                  decode_config=None, gate_up_parts=None, accumulator=None):
  """SiLU(x W_gate) ⊙ (x W_up) @ W_down for a decode step's MLP (w_gate_up [D, 2F] = [W_gate |
  W_up] with the Linears' multipliers on their columns; w_down [F, N]; the down product's own
  multiplier is the caller's).

  Where both products go through the GEMV at batch 1 (`DecodeConfig.use_gemv`) and the gate and
  up multipliers are 1, `DecodeConfig.gemv_swiglu` chains two GEMV kernels: the second sums the
  first one's split partials and makes the SiLU product as it reads them (no kernel between
  them; the same roundings). Else `decode_dot`, the SiLU product, `decode_dot`.
  `gate_up_parts`: x W_gate_up's float32 split partials [S, 1, 2F], already made at batch 1
  (`decode_norm_dot`, which also made x); x_BxD is then None.
  The gate/up product runs with `DecodeConfig.gemv_launch_for("mlp_in")`, the down product with
  "mlp_out"'s. The chained kernel takes a power of two of partials: another count S (mlp_in's
  settings split D into S K ranges) is summed by XLA into one partial first (same result).
  `accumulator` (the chained kernels only: ValueError otherwise): float32 zeros [1, N] into which
  the down GEMV adds its partials atomically (`decode_gemv.gemv_swiglu_pallas`); the float32 sum
  is returned unrounded.
  """
  from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
  cfg = DecodeConfig.or_default(decode_config)
  (B, D), F = ((1, w_gate_up.shape[0]) if x_BxD is None else x_BxD.shape), w_down.shape[0]
  dtype = w_gate_up.dtype if x_BxD is None else jnp.result_type(x_BxD, w_gate_up)
  if (B == 1 and cfg.gemv_swiglu and cfg.use_gemv(1, contract_dim=D)
      and cfg.use_gemv(1, contract_dim=F) and all(l.multiplier == 1.0 for l in gate_up_linears)):
    from kernels_pallas import decode_gemv  # pylint: disable=import-outside-toplevel
    parts = gate_up_parts
    if parts is None:
      parts = decode_gemv.gemv_pallas(x_BxD.astype(w_gate_up.dtype), w_gate_up, sum_splits=False,
                                      **cfg.gemv_launch_for("mlp_in"))   # [S, 1, 2F]
    mosaic = None if accumulator is not None else mosaic_launch(cfg, "mlp_out", *w_down.shape)
    if mosaic is not None:          # DecodeConfig.gemv_backend "mosaic": any count of partials
      from kernels_pallas import decode_gemv_mgpu  # pylint: disable=import-outside-toplevel
      y = decode_gemv.split_sum(decode_gemv_mgpu.gemv_swiglu_mgpu(parts, w_down, **mosaic))
      return y.astype(jnp.result_type(dtype, w_down))
    if parts.shape[0] & (parts.shape[0] - 1):    # the kernel takes a power of two of partials
      parts = jnp.sum(parts, axis=0, keepdims=True)
    y = decode_gemv.gemv_swiglu_pallas(parts, w_down, accumulator=accumulator,
                                       **cfg.gemv_launch_for("mlp_out"))
    return y if accumulator is not None else y.astype(jnp.result_type(dtype, w_down))
  if accumulator is not None:
    raise ValueError("decode_swiglu: `accumulator` is given but the MLP's products are not the "
                     "chained batch-1 GEMVs (DecodeConfig.gemv_swiglu, use_gemv, gate/up "
                     "multipliers 1); expected None.")
  if gate_up_parts is not None:
    gu = jnp.sum(gate_up_parts, axis=0).astype(dtype)       # as decode_dot sums the GEMV's
  else:
    gu = decode_dot(x_BxD, w_gate_up, matmul_rows, decode_config=decode_config,
                    product="mlp_in")
  gu = scale_columns(gu, gate_up_linears)
  return decode_dot(jax.nn.silu(gu[:, :F]) * gu[:, F:], w_down, matmul_rows,
                    decode_config=decode_config, product="mlp_out")


def short_conv_step(x_BxC, state_BxWxC, w_WxC):
  """One decode token of `ShortConv`: y = SiLU(Σ_i w_i ⊙ window_i), window = [state, x].

  Returns (y [B, C] in the state's dtype, the window without its oldest input). The taps are
  summed in float32 in the forward's order (w given in the compute dtype, as the forward rounds it).
  """
  window_BxWxC = jnp.concatenate([state_BxWxC, x_BxC.astype(state_BxWxC.dtype)[:, None]], axis=1)
  y = jnp.zeros(x_BxC.shape, jnp.float32)
  for i in range(w_WxC.shape[0]):
    y = y + window_BxWxC[:, i].astype(jnp.float32) * w_WxC[i].astype(jnp.float32)
  return jax.nn.silu(y).astype(state_BxWxC.dtype), window_BxWxC[:, 1:]


def _stratified_uniform(key, n: int):
  """n draws, each marginally U(0, 1), one in each interval [i/n, (i+1)/n) in random order.

  Per head this is fla's U(0, 1) draw; stratifying keeps the head average of the decay rates
  close to its expectation even with few heads, so small and large models (and the coordinate
  check across widths) start from the same distribution of time scales.
  """
  perm_key, u_key = jax.random.split(key)
  strata = jax.random.permutation(perm_key, n).astype(jnp.float32)
  return (strata + jax.random.uniform(u_key, (n,), jnp.float32)) / n


def _inverse_softplus(y):
  """x with softplus(x) = y, i.e. x = y + log(1 − e^{−y}) (y > 0)."""
  return y + jnp.log(-jnp.expm1(-y))


class GatedDeltaNet(nnx.Module):
  """The Gated DeltaNet token mixer (Yang, Kautz & Hatamizadeh 2024; fla's layer).

  For input x_t (width D), Hk q/k heads of dim K and H value heads of dim V (H % Hk == 0):

      q_t = L2(SiLU(conv(W_q x)))_h,  k_t = L2(SiLU(conv(W_k x)))_h,  v_t = SiLU(conv(W_v x))_h
      β_t = σ(W_b x_t)            (2σ(·) with allow_neg_eigval: eigenvalues of I − βkkᵀ in (−1, 1])
      g_t = −exp(A_log) · softplus(W_a x_t + dt_bias)                (log decay ≤ 0, per value head)
      S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = qk_scale · S_tᵀ q_t
      y_t = W_o [ RMSNorm_V(o_t) · w · SiLU(W_g x_t) ]

  A = exp(A_log) ~ U(0, 16) (clamped ≥ 1e-4 so log A is finite); dt log-uniform in [1e-3, 0.1]
  (clamped ≥ 1e-4), dt_bias = softplus⁻¹(dt), as in fla, but stratified over heads. qk_scale = K^-1/2 by default; μP sets
  it (docs/mup.md: with L2-normalised q, k the 1/d attention rule reduces to a constant).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.num_heads, self.num_v_heads = c.num_heads, c.resolved_num_v_heads
    self.head_k_dim, self.head_v_dim = c.head_k_dim, c.head_v_dim
    Hk, H, K, V, D = self.num_heads, self.num_v_heads, c.head_k_dim, c.head_v_dim, c.d_model
    lin = dict(init_std=c.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(D, Hk * K, **lin, role="qk_proj")
    self.k_proj = Linear(D, Hk * K, **lin, role="qk_proj")
    self.v_proj = Linear(D, H * V, **lin)
    self.a_proj = Linear(D, H, **lin, role="gate_proj")
    self.b_proj = Linear(D, H, **lin, role="gate_proj")
    if c.use_short_conv:
      conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, impl=c.conv_impl)
      self.q_conv = ShortConv(Hk * K, c.conv_size, **conv)
      self.k_conv = ShortConv(Hk * K, c.conv_size, **conv)
      self.v_conv = ShortConv(H * V, c.conv_size, **conv)
    A = 16.0 * _stratified_uniform(rngs.params(), H)
    self.A_log = param(jnp.log(jnp.maximum(A, 1e-4)).astype(param_dtype),
                       fan_in_axes=(), fan_out_axes=(0,), weight_decay=False, role="gate_scalar")
    u = _stratified_uniform(rngs.params(), H)
    dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
    self.dt_bias = param(_inverse_softplus(dt).astype(param_dtype),
                         fan_in_axes=(), fan_out_axes=(0,), weight_decay=False,
                         role="gate_scalar")
    if c.use_gate:
      self.g_proj = Linear(D, H * V, **lin)
    self.o_norm = GatedRMSNorm(V, eps=c.resolved_output_norm_eps, dtype=dtype,
                               param_dtype=param_dtype)
    self.o_proj = Linear(H * V, D, **lin)
    self.use_gate, self.use_short_conv = c.use_gate, c.use_short_conv
    self.allow_neg_eigval = c.allow_neg_eigval
    self.beta_scale = 2.0 if c.allow_neg_eigval else 1.0   # β = beta_scale · σ(W_b x)
    self.chunk_size, self.rule_impl = c.chunk_size, c.rule_impl
    self.kernel_config = c.gpu_kernel_config()   # GpuConfig or None; not for the TPU kernel
    self.fuse_projections = c.fuse_projections
    self.qk_scale = K ** -0.5
    self.qk_norm_eps = float(c.qk_norm_eps)
    self.dtype = dtype
    self.record = False

  def init_cache(self, batch: int, state_dtype=jnp.float32) -> dict:
    """Empty decode cache: {'S': state [B, H, K, V] (float32, or `state_dtype`), 'conv': the
    last W−1 pre-conv inputs of q | k | v side by side [B, W−1, 2·Hk·K + H·V] (compute dtype;
    only with the short conv)}. `__call__` takes its cache in another form (`call_cache`)."""
    cache = {'S': jnp.zeros((batch, self.num_v_heads, self.head_k_dim, self.head_v_dim),
                            state_dtype)}
    if self.use_short_conv:
      cache['conv'] = jnp.concatenate(
          [getattr(self, f'{name}_conv').init_state(batch) for name in ('q', 'k', 'v')], axis=-1)
    return cache

  def call_cache(self, cache: dict) -> dict:
    """A decode cache in `__call__`'s form: S (float32) and one conv state per q, k, v."""
    out = {'S': cache['S'].astype(jnp.float32)}
    if self.use_short_conv:
      QK = self.num_heads * self.head_k_dim
      conv = cache['conv']
      out.update(q_conv=conv[..., :QK], k_conv=conv[..., QK:2 * QK], v_conv=conv[..., 2 * QK:])
    return out

  def decode_cache(self, call_cache: dict, state_dtype=jnp.float32) -> dict:
    """`__call__`'s returned cache in the decode form of `init_cache`."""
    out = {'S': call_cache['S'].astype(state_dtype)}
    if self.use_short_conv:
      out['conv'] = jnp.concatenate([call_cache[f'{n}_conv'] for n in ('q', 'k', 'v')], axis=-1)
    return out

  def _sow(self, name, value):
    if self.record:
      self.sow(nnx.Intermediate, name, value)

  def _features(self, x, segment_ids, cache, single_token: bool, projected=None):
    """q, k, v (after conv + SiLU, before the L2 norm), with the new conv states. `projected`:
    the input projections already made ({name: W_name x}, `_project`)."""
    feats, new_cache = [], {}
    for name in ('q', 'k', 'v'):
      f = projected[name] if projected else getattr(self, f'{name}_proj')(x)
      if self.use_short_conv:
        conv = getattr(self, f'{name}_conv')
        state = None if cache is None else cache[f'{name}_conv']
        if single_token:
          f, new_cache[f'{name}_conv'] = conv.step(f, state)
        else:
          f, new_cache[f'{name}_conv'] = conv(f, segment_ids, state)
      else:
        f = jax.nn.silu(f)
      feats.append(f)
    return feats, new_cache

  def _gates(self, x, projected=None):
    """β = σ(W_b x) (or 2σ), g = −exp(A_log) softplus(W_a x + dt_bias), float32."""
    b = (projected['b'] if projected else self.b_proj(x)).astype(jnp.float32)
    beta = jax.nn.sigmoid(b) * self.beta_scale
    a = (projected['a'] if projected else self.a_proj(x)).astype(jnp.float32)
    g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
        a + self.dt_bias[...].astype(jnp.float32))
    return beta, g

  def _project(self, x) -> dict | None:
    """With fuse_projections: {q, k, v, (g,) a, b: W x} from one product (`fused_linears`);
    else None (each projection is made where it is used)."""
    if not self.fuse_projections:
      return None
    names = ['q', 'k', 'v'] + (['g'] if self.use_gate else []) + ['a', 'b']
    return dict(zip(names, fused_linears(x, self._in_projs(), self.dtype)))

  def _output(self, o, x, projected=None):
    """W_o [RMSNorm_V(o) · w · SiLU(W_g x)], o: [..., H, V]."""
    gate = None
    if self.use_gate:
      gate = (projected['g'] if projected else self.g_proj(x)).reshape(o.shape)
    y = self.o_norm(o, gate)
    return self.o_proj(y.reshape(*y.shape[:-2], -1))

  def __call__(self, x_BxTxD, segment_ids_BxT=None, *, cache=None, return_cache: bool = False):
    """Full-sequence forward (chunked rule). With `cache`, continues from it (prefill).

    Returns y [B, T, D], or (y, new cache) with return_cache.
    """
    B, T, _ = x_BxTxD.shape
    Hk, H, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    self._sow('mixer_in', x_BxTxD)
    projected = self._project(x_BxTxD)
    (q, k, v), new_cache = self._features(x_BxTxD, segment_ids_BxT, cache, single_token=False,
                                          projected=projected)
    self._sow('q', q)
    self._sow('k', k)
    self._sow('v', v)
    beta, g = self._gates(x_BxTxD, projected)
    self._sow('beta', beta)
    self._sow('g', g)
    o, S = gated_delta_rule(
        q.reshape(B, T, Hk, K), k.reshape(B, T, Hk, K), v.reshape(B, T, H, V), g, beta,
        scale=self.qk_scale, initial_state=None if cache is None else cache['S'],
        output_final_state=return_cache or self.record, use_qk_l2norm=True,
        qk_norm_eps=self.qk_norm_eps, segment_ids=segment_ids_BxT, chunk_size=self.chunk_size,
        impl=self.rule_impl,
        kernel_config=None if jax.default_backend() == "tpu" else self.kernel_config)
    self._sow('S', S)
    self._sow('o', o)
    y = self._output(o, x_BxTxD, projected)
    self._sow('mixer_out', y)
    if not return_cache:
      return y
    new_cache['S'] = S
    return y, new_cache

  def _in_projs(self):
    """The input projections in the column order of `decode_weights()['in']`."""
    return ([self.q_proj, self.k_proj, self.v_proj] + ([self.g_proj] if self.use_gate else [])
            + [self.a_proj, self.b_proj])

  def decode_weights(self, column_multiple: int = 1) -> dict:
    """The weights of `step`, built once per generation (outside its loop): 'in', the input
    projections side by side [D, 2·Hk·K + H·V (+ H·V gate) + 2H] (columns q | k | v | gate | a |
    b, one matmul per token instead of six; with zero columns after them up to a multiple of
    `column_multiple`, whose outputs nothing reads), 'conv', the three conv filters
    [W, 2·Hk·K + H·V], and 'o', W_o, all in the compute dtype (the forward casts them to it on
    every call)."""
    w_in = stacked_kernel(self._in_projs(), self.dtype)
    pad = -w_in.shape[1] % column_multiple
    w = {'in': jnp.pad(w_in, ((0, 0), (0, pad))) if pad else w_in,
         'o': self.o_proj.kernel[...].astype(self.dtype)}
    if self.use_short_conv:
      w['conv'] = jnp.concatenate([getattr(self, f'{n}_conv').weight[...].astype(self.dtype)
                                   for n in ('q', 'k', 'v')], axis=1)
    return w

  def step(self, x_BxD, cache, weights=None, *, impl: str = "xla", matmul_rows: int = 1,
           decode_config=None, in_norm=None, sum_out: bool = True, in_addend=None):
    """One decode token; returns (y [B, D], new cache), what `__call__` gives for this token.

    `cache` as `init_cache` makes it; `weights` from `decode_weights()` (None: built here). The
    rule's update is `gated_delta_rule_step` (impl "xla"), its Pallas kernel (impl "pallas",
    `kernels_pallas/decode_step.py`), or one kernel that also runs the short conv, SiLU and q/k
    L2 norms (impl "pallas_fused", `kernels_pallas/decode_fused.py`; without a short conv it is
    "pallas"). `matmul_rows`: `decode_dot`'s padding of the projections. `decode_config`: the
    Pallas kernels' launch settings (`kernels_pallas.config.DecodeConfig`; None: defaults; the
    GEMVs of products "in_proj" and "out_proj", `DecodeConfig.gemv_launch_for`).
    Batch 1 on the GEMV path only (`Block.step` checks `DecodeConfig.use_gemv_norm`): `in_norm`
    (an RMSNorm) takes x as the residual stream and makes in_norm(x) in the in-projection's GEMV
    (`decode_norm_dot`); `sum_out=False` returns W_o's float32 split partials [S, 1, D] unsummed
    and without o_proj's multiplier (for the next GEMV's prologue to add; with
    `DecodeConfig.gemv_out_atomic` and in_norm, their sum [1, 1, D], added atomically).
    `in_addend` (with in_norm): (addends [S, 1, D] float32, multiplier), the previous block's
    output not yet added to x (`model.Block.step_deferred`), added in the in-projection's
    prologue; the stream with it added is then returned as a third output. At batch 1 on the GEMV
    path with `DecodeConfig.gemv_out_norm` (and V a multiple of out_proj's K tile), the gated
    output norm is made in W_o's GEMV (`decode_gemv.gemv_gated_norm_pallas`), either way.
    """
    launch = {} if decode_config is None else dict(block_v=decode_config.block_v,
                                                   num_warps=decode_config.num_warps)
    w = self.decode_weights() if weights is None else weights
    B, dt = x_BxD.shape[0], self.dtype
    Hk, H, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    C = 2 * Hk * K + H * V
    projs = self._in_projs()
    new_cache = {}
    from kernels_pallas import decode_gemv  # pylint: disable=import-outside-toplevel
    from kernels_pallas.config import DecodeConfig  # pylint: disable=import-outside-toplevel
    cfg = DecodeConfig.or_default(decode_config)
    launch_o = cfg.gemv_launch_for("out_proj")
    ring = impl == "pallas_fused" and self.use_short_conv and 'ring_q' in cache
    # The gated output norm in W_o's GEMV prologue: its K tiles must each lie inside one head.
    norm_in_gemv = (cfg.use_gemv_out_norm(B, H * V) and w['o'].dtype == dt
                    and V % decode_gemv.block_k_for(H * V, launch_o["block_k"]) == 0)
    # DecodeConfig.gemv_in_partials: the in-projection's split partials go unsummed to the ring
    # kernel (q | k | v, W_a x, W_b x) and W_o's prologue (the gate), which sum them.
    in_parts = (cfg.gemv_in_partials and B == 1 and ring and (norm_in_gemv or not self.use_gate)
                and (in_norm is not None or cfg.use_gemv(1, contract_dim=x_BxD.shape[1])))
    # DecodeConfig.gemv_out_atomic: W_o's programs add their partials atomically into zeros that
    # the in-projection's GEMV makes, so the next prologue reads one addend instead of S.
    D = w['o'].shape[1]
    out_atomic = (cfg.gemv_out_atomic and cfg.gemv_backend == "triton" and in_norm is not None
                  and not sum_out and D % launch_o["block_n"] == 0)
    accumulator, stream = None, ()
    with jax.named_scope("in_proj"):   # scopes name the parts in profiles (bench_decode.py)
      if in_norm is not None:
        addend = {} if in_addend is None else dict(addends_SxD=in_addend[0],
                                                   addend_multiplier=in_addend[1])
        y, stream, *zeros = decode_norm_dot(x_BxD, w['in'], in_norm, sum_splits=not in_parts,
                                            zeros_out=D if out_atomic else 0,
                                            decode_config=decode_config, product="in_proj",
                                            **addend)
        accumulator = zeros[0] if zeros else None
        stream = (stream,) if in_addend is not None else ()
      elif in_parts:
        y = decode_gemv.gemv_pallas(x_BxD.astype(dt), w['in'], sum_splits=False,
                                    **cfg.gemv_launch_for("in_proj"))
      else:
        y = decode_dot(x_BxD.astype(dt), w['in'], matmul_rows, decode_config=decode_config,
                       product="in_proj")
      if not in_parts:   # partials: the consumers apply the multipliers
        y = scale_columns(y, projs)

    a_col = C + (H * V if self.use_gate else 0)   # W_a x, then W_b x (then any padding)

    def gates():   # (β, g) from y's columns of W_a x and W_b x
      with jax.named_scope("conv_gates"):
        return self._gates(None, {'a': y[:, a_col:a_col + H], 'b': y[:, a_col + H:a_col + 2 * H]})

    if ring:
      # The conv state as rings (`generate` converts it once per call; decode_fused.py): no window
      # is built and no state cut from it; the kernel writes this token's input into row pos,
      # and makes the gates itself.
      from kernels_pallas.decode_fused import gdn_decode_fused_ring_pallas
      with jax.named_scope("rule"):
        rings = (cache['ring_q'], cache['ring_k'], cache['ring_v'])
        multipliers = (tuple(float(p.multiplier) for p in projs[:3] + projs[-2:]) if in_parts
                       else None)
        o, new_cache['S'], rings = gdn_decode_fused_ring_pallas(
            cache['ring_pos'], rings, y, w['conv'], self.A_log[...], self.dt_bias[...],
            cache['S'], num_heads=Hk, head_k_dim=K, scale=self.qk_scale,
            qk_norm_eps=self.qk_norm_eps, gate_columns=(a_col, a_col + H),   # it makes g, β
            beta_scale=self.beta_scale, **launch,
            **({} if multipliers is None else dict(column_multipliers=multipliers)))
        new_cache.update(zip(('ring_q', 'ring_k', 'ring_v'), rings))
    elif impl == "pallas_fused" and self.use_short_conv:
      # The conv, SiLU, L2 norms and the rule in one kernel; the window is the conv state with
      # this token appended, and its last W − 1 inputs are the new conv state.
      from kernels_pallas.decode_fused import gdn_decode_fused_pallas
      beta, g = gates()
      with jax.named_scope("rule"):
        conv = cache['conv']
        window = jnp.concatenate([conv, y[:, None, :C].astype(conv.dtype)], axis=1)
        new_cache['conv'] = window[:, 1:]
        o, new_cache['S'] = gdn_decode_fused_pallas(
            window, w['conv'], g, beta, cache['S'], num_heads=Hk, head_k_dim=K,
            scale=self.qk_scale, qk_norm_eps=self.qk_norm_eps, **launch)
    else:
      beta, g = gates()
      with jax.named_scope("conv_gates"):
        if self.use_short_conv:
          f, new_cache['conv'] = short_conv_step(y[:, :C], cache['conv'], w['conv'])
        else:
          f = jax.nn.silu(y[:, :C])
        l2 = lambda x: (x.astype(jnp.float32) * jax.lax.rsqrt(
            jnp.sum(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + self.qk_norm_eps)
                        ).astype(dt)   # as gated_delta_rule's use_qk_l2norm
        q = l2(f[:, :Hk * K].reshape(B, Hk, K))
        k = l2(f[:, Hk * K:2 * Hk * K].reshape(B, Hk, K))
        v = f[:, 2 * Hk * K:].reshape(B, H, V)
      with jax.named_scope("rule"):
        if impl == "xla":
          o, new_cache['S'] = gated_delta_rule_step(q, k, v, g, beta, cache['S'],
                                                    scale=self.qk_scale)
        elif impl in ("pallas", "pallas_fused"):  # imported lazily: an optional layer
          from kernels_pallas.decode_step import gated_delta_rule_step_pallas
          o, new_cache['S'] = gated_delta_rule_step_pallas(q, k, v, g, beta, cache['S'],
                                                           scale=self.qk_scale, **launch)
        else:
          raise ValueError(f"GatedDeltaNet.step: `impl`={impl!r}; expected 'xla', 'pallas' or "
                           "'pallas_fused'.")
    with jax.named_scope("out_proj"):
      mosaic = (None if accumulator is not None or B != 1 or w['o'].dtype != dt
                else mosaic_launch(cfg, "out_proj", *w['o'].shape))
      if norm_in_gemv and mosaic is not None and V % decode_gemv.block_k_for(
          H * V, mosaic["block_k"]) == 0:
        # DecodeConfig.gemv_backend "mosaic": the gated output norm in the Mosaic GPU GEMV.
        from kernels_pallas import decode_gemv_mgpu  # pylint: disable=import-outside-toplevel
        out = decode_gemv_mgpu.gemv_gated_norm_mgpu(
            o.reshape(1, H * V), y if self.use_gate else None, w['o'], self.o_norm.weight[...],
            eps=float(self.o_norm.eps), head_dim=V, gate_column=C,
            gate_multiplier=float(self.g_proj.multiplier) if in_parts and self.use_gate else 1.0,
            **mosaic)
        if not sum_out:
          return out, new_cache, *stream
        out = decode_gemv.split_sum(out).astype(dt)
      elif norm_in_gemv:
        # The gated output norm in W_o's GEMV prologue (DecodeConfig.gemv_out_norm): it reads o
        # and the gate columns of y (or of its partials) where they are and rounds where the norm
        # below rounds.
        out = decode_gemv.gemv_gated_norm_pallas(
            o.reshape(1, H * V), y if self.use_gate else None, w['o'], self.o_norm.weight[...],
            eps=float(self.o_norm.eps), head_dim=V, gate_column=C, sum_splits=sum_out,
            gate_multiplier=float(self.g_proj.multiplier) if in_parts and self.use_gate else 1.0,
            accumulator=accumulator, **launch_o)
        if not sum_out:
          return (out if accumulator is None else out[None]), new_cache, *stream
        out = out.astype(dt)                          # as decode_dot rounds the GEMV's sum
      else:
        gate = y[:, C:C + H * V].reshape(B, H, V) if self.use_gate else None
        h_o = self.o_norm(o.astype(dt), gate).reshape(B, H * V)
        if not sum_out:
          if mosaic is not None:
            from kernels_pallas import decode_gemv_mgpu  # pylint: disable=import-outside-toplevel
            return (decode_gemv_mgpu.gemv_mgpu(h_o.astype(w['o'].dtype), w['o'], **mosaic),
                    new_cache, *stream)
          out = decode_gemv.gemv_pallas(h_o.astype(w['o'].dtype), w['o'], sum_splits=False,
                                        accumulator=accumulator, **launch_o)
          return (out if accumulator is None else out[None]), new_cache, *stream
        out = decode_dot(h_o, w['o'], matmul_rows, decode_config=decode_config,
                         product="out_proj")
      if self.o_proj.multiplier != 1.0:
        out = out * jnp.asarray(self.o_proj.multiplier, dt)
    return out, new_cache, *stream


def gated_delta_rule_step(q_BxHkxK, k_BxHkxK, v_BxHxV, g_BxH, beta_BxH, S_BxHxKxV, *,
                          scale: float):
  """One token of the gated delta rule, fused (no scan over a length-1 sequence):

      a = Sᵀk,  c = Sᵀq                        (one pass over S: one two-output reduction)
      δ = β (v − e^g a)
      S' = e^g S + k δᵀ                         (= e^g (I − β k kᵀ) S + β k vᵀ; a second pass)
      o = scale (e^g c + (kᵀq) δ)               (= scale S'ᵀ q, without a third pass over S')

  q, k: [B, Hk, K], L2-normalised; value head h reads q/k head h // (H / Hk). v: [B, H, V];
  g, β: [B, H]; S: [B, H, K, V] (float32 or bfloat16 storage; the math is float32).
  Returns (o [B, H, V] float32, S' in S's dtype).
  """
  f32 = jnp.float32
  G = v_BxHxV.shape[1] // q_BxHkxK.shape[1]
  expand = lambda x: jnp.repeat(x.astype(f32), G, axis=1) if G > 1 else x.astype(f32)
  q, k = expand(q_BxHkxK), expand(k_BxHkxK)
  S = S_BxHxKxV.astype(f32)
  e = jnp.exp(g_BxH.astype(f32))[..., None]                              # [B, H, 1]
  # One reduction with two outputs, not two sums: the update below then depends on every read of
  # the old S, so XLA updates the loop-carried S in place (two independent sums left their order
  # against the write open and made XLA copy S on every step).
  a, c = jax.lax.reduce((S * k[..., None], S * q[..., None]), (f32(0), f32(0)),
                        lambda x, y: (x[0] + y[0], x[1] + y[1]), (2,))           # [B, H, V]
  delta = beta_BxH.astype(f32)[..., None] * (v_BxHxV.astype(f32) - e * a)
  o = scale * (e * c + jnp.sum(k * q, axis=-1, keepdims=True) * delta)
  S_new = e[..., None] * S + k[..., :, None] * delta[..., None, :]
  return o, S_new.astype(S_BxHxKxV.dtype)


class SwiGLU(nnx.Module):
  """y = W_down (SiLU(W_gate x) ⊙ W_up x)."""

  def __init__(self, d_model: int, hidden: int, *, init_std: float, dtype, param_dtype,
               rngs: nnx.Rngs, fuse_projections: bool = False):
    lin = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(d_model, hidden, **lin)
    self.up_proj = Linear(d_model, hidden, **lin)
    self.down_proj = Linear(hidden, d_model, **lin)
    self.fuse_projections = fuse_projections

  def __call__(self, x):
    if self.fuse_projections:   # W_gate and W_up in one product (fused_linears)
      gate, up = fused_linears(x, [self.gate_proj, self.up_proj], self.down_proj.dtype)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(jax.nn.silu(gate) * up)
