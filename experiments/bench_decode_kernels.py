"""Launch-knob sweep of the single-token decode step's Pallas kernels at the 512M model's shapes, on
one GPU in one process: which tiles, splits, warps and pipelining stages make each kernel fastest.

    source experiments/device/setup.sh; python -m experiments.bench_decode_kernels --out_dir=$OUT
    python -m experiments.bench_decode_kernels --config=tiny --kernels=inproj,rule     # CPU

Kinds, one per kernel call of a decode step (shapes of the 512M config, batch 1, bf16 weights):
  inproj       gemv_pallas         x [B, D] @ W_in [D, 2·Hk·K + 2·H·V + 2H]  (1024 × 9228), summed
  oproj        gemv_pallas         h [B, H·V] @ W_o [H·V, D]                 (3072 × 1024), summed
  gateup       gemv_pallas         x [B, D] @ W_gate|up [D, 2F]          (1024 × 5632), partials
  down_swiglu  gemv_swiglu_pallas  SiLU(g) ⊙ u of gateup's partials @ W_down [F, D] (2816 × 1024)
  head         gemv_pallas         x [B, D] @ W_head [D, vocab]          (1024 × 32000, untied)
  inproj_norm  gemv_norm_pallas    the mixer's RMSNorm in inproj's prologue
  gateup_norm  gemv_norm_pallas    W_o's split partials + residual + the MLP's norm in gateup's
  head_norm    gemv_norm_pallas    the final norm in the read-out's prologue
  rule         gdn_decode_fused_ring_pallas   conv rings, gates, q/k norms and the rule's update of
               a bf16 state [B, H, K, V] (6 × 256 × 512: 1.5 MB per layer)
Every kernel is called as `layers.py` / `model.py` call it (`sum_splits`, the partials' counts: the
down product reads the gate/up GEMV's partials, the gate/up prologue W_o's, each made with the
same knobs); the norm and SwiGLU kinds are batch 1 only and skipped at other batches.

Method. A decode step reads ~1 GB of distinct weights; one kernel re-reading one W (≤ 65 MB) would
hit the 50-60 MB L2 and look too fast. So each (kind, knob setting) is ONE jitted program calling
the kernel on L distinct weights (states for the rule) in a Python-unrolled loop (a scan would
copy its dynamic slice of a stacked W before the custom call), L = max(8, ⌈--min_bytes / bytes of
one W⌉): every call's W is cold in L2. The small inputs (x, the norm's gain and addends, the conv
filters, the gates' parameters) are shared by the L calls, as they come from L2 in a real step
(and a few arguments keep the host's dispatch short). The GEMVs return their L outputs (nothing
else runs in the program but what the model runs with the kernel: the split sum of
`sum_splits`); the rule's states and rings are donated and updated in place, each call's results
fed to the next (its rings chained through the L layers), as in the decode loop.
A sample is `--calls_per_sample` back-to-back calls, then one block_until_ready (the host's
dispatch of the next call overlaps the device's work on this one, so the fixed cost of a call and
its synchronisation is not charged to L kernels); µs per kernel call = median sample / (calls · L)
over `--repeats` samples after a warm-up call. `host_bound` marks a row whose dispatch alone took
≥ 80 % of its sample (the device waited for the host: the time is then an upper bound).
GB/s = the bytes a call must move (W and its inputs; the rule: its state read and written) / µs.
`hlo_copies`: copies among the compiled program's kernels (0 expected on a GPU: a copy of a
donated state before its kernel would be timed with it).

Baselines in the same process: XLA's product `jnp.dot(x, W, preferred_element_type=f32)` of each
GEMV shape on the same L weights, one x per product (XLA's DotMerger would make products of one
shared x one product of the L weights concatenated; the norm and SwiGLU kinds: the plain product
of their shape, no prologue), the unfused XLA step (`layers.short_conv_step`, the L2 norms, the
gates, `layers.gated_delta_rule_step`) for the rule, and the copy bandwidth of a 1 GB array
(`bench_decode.measure_bandwidth`).

Correctness: every program's output on the first weight (the rule: o and S') against the float32
XLA composition of the same math (HIGHEST precision products), max |error| / max |reference|;
above --tolerance the row is marked wrong (still recorded).

Knob grids (--grid; every list is a flag, so a call can narrow it): "oat" varies one GEMV knob at
a time over its list with the others at DecodeConfig's defaults; "small" (default) adds the product
block_n {64, 128} × block_k {128, 256} × num_warps {4, 8} × num_stages {2, 3} × min_programs
{264, 528} (the values in the lists); "full" is the product of the lists. The rule sweeps
block_v × num_warps (always the product). Settings that launch the same kernel (block_k lowered to
a divisor of K, min_programs giving the same K splits) are compiled and timed once and share the
row's numbers (`same_launch_as`).

Order: per kind (in --kernels order), all programs compiled in --compile_workers threads, then
timed one after another. Each kind gets an equal share of the budget left; programs not compiled
by then are rows with that error. A setting that fails to compile or run is a row with its error.
The results (bench_decode_kernels_<device>[_<config>][_<tag>].json and .md, in --out_dir, else
$OUT, else experiments/results) are rewritten after every row; a line per row goes to stdout.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_decode import device_slug, measure_bandwidth, model_config
from gdn_jax.layers import gated_delta_rule_step, rms_normalize, short_conv_step
from kernels_pallas import decode_gemv
from kernels_pallas.config import DecodeConfig
from kernels_pallas.decode_fused import (fused_block_v, gdn_decode_fused_ring_pallas,
                                         ring_from_state, state_from_ring)
from kernels_pallas.decode_gemv_mgpu import gemv_mgpu, gemv_norm_mgpu

KINDS = ("inproj", "rule", "gateup", "oproj", "down_swiglu", "head", "inproj_norm", "gateup_norm",
         "head_norm")                      # the default order: by their share of a step's time
BATCH_1_ONLY = ("down_swiglu", "inproj_norm", "gateup_norm", "head_norm")
GEMV_KNOBS = ("block_n", "block_k", "min_programs", "num_warps", "num_stages")
# The plain and norm GEMV kinds' implementations (--gemv_impls): the Triton kernels (decode_gemv),
# and the Mosaic GPU ones (decode_gemv_mgpu) without and with programmatic dependent launch.
GEMV_IMPLS = ("triton", "mgpu", "mgpu_pdl")
SMALL_PRODUCT = dict(block_n=(64, 128), block_k=(128, 256), min_programs=(264, 528),
                     num_warps=(4, 8), num_stages=(2, 3))
TINY = dict(layers=2, rule_layers=2, repeats=2)     # --config=tiny: a CPU run in seconds
# The two GEMV paths of a step (DecodeConfig.gemv_norm off / on): their kinds' calls per token.
STEP_PATHS = {"unfused norms": ("inproj", "oproj", "gateup", "down_swiglu", "head"),
              "norms in the GEMVs": ("inproj_norm", "oproj", "gateup_norm", "down_swiglu",
                                     "head_norm")}


@dataclasses.dataclass
class Options:
  config: str = "512m"
  kernels: tuple = KINDS
  batch: int = 1
  grid: str = "small"
  block_n: tuple = (32, 64, 128, 256)
  block_k: tuple = (64, 128, 256)
  min_programs: tuple = (132, 264, 528, 1056)
  num_warps: tuple = (2, 4, 8)
  num_stages: tuple = (1, 2, 3, 4)
  rule_block_v: tuple = (8, 16, 32, 64, 128)
  rule_num_warps: tuple = (1, 2, 4, 8)
  gemv_impls: tuple = ("triton",)
  min_bytes: int = 256 << 20     # distinct weight (state) bytes per program: L2 always cold
  layers: int = 0                # L of the GEMV programs; 0: from min_bytes (tiny: 2)
  rule_layers: int = 0           # L of the rule programs; 0: from min_bytes (tiny: 2)
  repeats: int = 0               # timed samples; 0: 20 (tiny: 2)
  calls_per_sample: int = 4
  compile_workers: int = 8
  time_budget_s: float = 420.0
  tolerance: float = 1e-2
  out_dir: str = ""
  tag: str = ""


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The decode step's dims, read from the benchmark's ModelConfig (bench_decode.CONFIGS)."""
  D: int
  Hk: int
  H: int
  K: int
  V: int
  F: int
  vocab: int
  conv: int
  num_layers: int
  norm_eps: float
  qk_norm_eps: float
  beta_scale: float

  @classmethod
  def of(cls, name: str) -> Shapes:
    c = model_config(name)
    if not (c.use_gate and c.use_short_conv):
      raise ValueError(f"bench_decode_kernels: config {name!r} has no output gate or short conv; "
                       "expected the GDN layer of the 512M model.")
    return cls(D=c.d_model, Hk=c.num_heads, H=c.resolved_num_v_heads, K=c.head_k_dim,
               V=c.head_v_dim, F=c.resolved_mlp_hidden, vocab=c.vocab_size, conv=c.conv_size,
               num_layers=c.num_layers, norm_eps=float(c.norm_eps),
               qk_norm_eps=float(c.qk_norm_eps), beta_scale=2.0 if c.allow_neg_eigval else 1.0)

  @property
  def C(self) -> int:
    """q | k | v channels (the conv's)."""
    return 2 * self.Hk * self.K + self.H * self.V

  @property
  def N_in(self) -> int:
    """Columns of the fused in-projection: q | k | v | output gate | a | b."""
    return self.C + self.H * self.V + 2 * self.H


def default_gemv_knobs() -> dict:
  return dict(DecodeConfig().gemv_launch)


def default_rule_knobs() -> dict:
  config = DecodeConfig()
  return dict(block_v=config.block_v, num_warps=config.num_warps)


def _dedupe(grid: list) -> list:
  seen, out = set(), []
  for knobs in grid:
    key = tuple(knobs.items())
    if key not in seen:
      seen.add(key)
      out.append(knobs)
  return out


def gemv_grid(opts: Options) -> list[dict]:
  """The GEMV knob settings of --grid, the default first."""
  if opts.grid not in ("oat", "small", "full"):
    raise ValueError(f"bench_decode_kernels: `grid`={opts.grid!r}; expected oat, small or full.")
  default = default_gemv_knobs()
  lists = {name: tuple(getattr(opts, name)) for name in GEMV_KNOBS}
  grid = [default]
  if opts.grid in ("oat", "small"):
    grid += [{**default, name: v} for name in GEMV_KNOBS for v in lists[name]]
  products = (lists if opts.grid == "full" else
              {n: [v for v in SMALL_PRODUCT[n] if v in lists[n]] for n in GEMV_KNOBS}
              if opts.grid == "small" else None)
  if products:
    grid += [dict(zip(GEMV_KNOBS, values)) for values in itertools.product(*products.values())]
  bad = [impl for impl in opts.gemv_impls if impl not in GEMV_IMPLS]
  if bad:
    raise ValueError(f"bench_decode_kernels: `gemv_impls` {bad}; expected some of {GEMV_IMPLS}.")
  # The Mosaic GPU kernels at the default tiles and splits, at 64 columns, and with fewer
  # programs of more W tiles each (all in flight at once; the other knobs are Triton's and do
  # not apply): plain and norm GEMV kinds only (GemvCase.variants).
  grid += [{**default, **tiles, "impl": impl} for impl in opts.gemv_impls if impl != "triton"
           for tiles in ({}, {"block_n": 64}, {"min_programs": 264}, {"min_programs": 132})]
  return _dedupe(grid)


def rule_grid(opts: Options) -> list[dict]:
  return _dedupe([default_rule_knobs()] + [
      dict(block_v=bv, num_warps=w) for bv in opts.rule_block_v for w in opts.rule_num_warps])


def gemv_splits(K: int, N: int, knobs: dict) -> int | None:
  """The K splits `decode_gemv` takes for a [K, N] product with these knobs; None where the
  block sizes are not powers of two (the kernel refuses them)."""
  bn, bk = knobs["block_n"], knobs["block_k"]
  if any(not isinstance(b, int) or b < 1 or b & (b - 1) for b in (bn, bk)):
    return None
  return decode_gemv.choose_splits(K, N, bn, decode_gemv.block_k_for(K, bk),
                                   knobs["min_programs"])


def layers_for(nbytes: int, min_bytes: int) -> int:
  return max(8, math.ceil(min_bytes / nbytes))


def _normal(key, shape, dtype, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


_normal_jit = jax.jit(_normal, static_argnums=(1, 2, 3))
HIGHEST = jax.lax.Precision.HIGHEST


def _specs(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# ------------------------------------------------------------------------------------ GEMV kinds


class GemvCase:
  """One GEMV kind: its L weights, shared inputs, program per knob setting (None: XLA's product),
  the float32 reference and the bytes a call reads."""

  def __init__(self, kind: str, s: Shapes, batch: int, layers: int, min_bytes: int):
    D, F = s.D, s.F
    self.kind, self.s, self.batch = kind, s, batch
    base = kind.removesuffix("_norm")
    self.op = "swiglu" if kind == "down_swiglu" else "norm" if kind.endswith("_norm") else "gemv"
    self.K, self.N = {"inproj": (D, s.N_in), "oproj": (s.H * s.V, D), "gateup": (D, 2 * F),
                      "down_swiglu": (F, D), "head": (D, s.vocab)}[base]
    # As the model calls them: the gate/up product hands its partials on at batch 1 (to the
    # down product, `layers.decode_swiglu`); the others are summed (`layers.decode_dot`).
    self.sum_splits = not (base == "gateup" and batch == 1)
    self.addends = kind == "gateup_norm"        # W_o's split partials in the prologue
    self.w_bytes = self.K * self.N * 2
    self.layers = layers or layers_for(self.w_bytes, min_bytes)
    self._weights = None
    self._shared = {}
    self._refs = {}

  def describe(self) -> str:
    B, K, N = self.batch, self.K, self.N
    what = {"gemv": f"gemv_pallas x [{B}, {K}] @ W [{K}, {N}]",
            "swiglu": f"gemv_swiglu_pallas SiLU(g) ⊙ u [1, {K}] (from partials [S, 1, {2 * K}]) "
                      f"@ W [{K}, {N}]",
            "norm": f"gemv_norm_pallas RMSNorm(x{' + Σ W_o partials' if self.addends else ''}) "
                    f"[1, {K}] @ W [{K}, {N}]"}[self.op]
    return what + ("" if self.sum_splits else ", split partials not summed")

  def variants(self, opts: Options) -> list[dict]:
    return [k for k in gemv_grid(opts) if self.op != "swiglu" or "impl" not in k]

  def default(self) -> dict:
    return default_gemv_knobs()

  def _input_splits(self, knobs: dict) -> int:
    """The partials the kernel's input has at these knobs: the gate/up GEMV's (down_swiglu;
    summed to one where not a power of two, as `layers.decode_swiglu` does), W_o's (gateup_norm)."""
    s = self.s
    if self.op == "swiglu":
      S = gemv_splits(s.D, 2 * s.F, knobs) or 1
      return S if S & (S - 1) == 0 else 1
    return gemv_splits(s.H * s.V, s.D, knobs) or 1

  def launch(self, knobs: dict) -> dict | None:
    """The launch these knobs make (None: block sizes the kernel refuses)."""
    S = gemv_splits(self.K, self.N, knobs)
    if S is None:
      return None
    bk = decode_gemv.block_k_for(self.K, knobs["block_k"])
    if "impl" in knobs:      # Mosaic GPU: batch 1, whole column blocks, ≥ 64-row tiles
      if self.batch != 1 or self.N % knobs["block_n"] or bk < 64:
        return None
      return dict(block_n=knobs["block_n"], block_k=bk, splits=S, impl=knobs["impl"])
    out = dict(block_n=knobs["block_n"], block_k=bk,
               splits=S, num_warps=knobs["num_warps"], num_stages=knobs["num_stages"])
    if self.op == "swiglu" or self.addends:
      out["input_splits"] = self._input_splits(knobs)
    return out

  def weights(self):
    if self._weights is None:
      self._weights = tuple(_normal_jit(jax.random.key(1000 + i), (self.K, self.N), jnp.bfloat16,
                                        self.K ** -0.5) for i in range(self.layers))
    return self._weights

  def _shared_inputs(self, knobs: dict | None):
    """The inputs all L calls share, made once per shape. XLA's products (knobs None) get one x
    each: on one shared x, XLA's DotMerger would make them one product with a concatenation of
    the L weights (the kernels' x is shared: in a step it comes from L2)."""
    s, bf16 = self.s, jnp.bfloat16
    if knobs is None:
      key = ("xs",)
    elif self.op == "gemv":
      key = ("x",)
    else:
      key = (self.op, self._input_splits(knobs) if self.op == "swiglu" or self.addends else 0)
    if key not in self._shared:
      ks = jax.random.split(jax.random.key(7), 3)
      if key[0] == "xs":
        shared = tuple(_normal(k, (self.batch, self.K), bf16)
                       for k in jax.random.split(ks[0], self.layers))
      elif key[0] == "x":
        shared = (_normal(ks[0], (self.batch, self.K), bf16),)
      elif key[0] == "swiglu":
        shared = (_normal(ks[0], (key[1], 1, 2 * self.K), jnp.float32, key[1] ** -0.5),)
      else:
        shared = (_normal(ks[0], (1, self.K), bf16), (1.0 + _normal(ks[1], (self.K,), jnp.float32,
                                                                     0.5)).astype(bf16))
        if self.addends:
          shared += (_normal(ks[2], (key[1], 1, s.D), jnp.float32, key[1] ** -0.5),)
      self._shared[key] = (key, shared)
    return self._shared[key]

  def args(self, knobs: dict | None):
    return (self._shared_inputs(knobs)[1], self.weights())

  def specs(self, knobs: dict | None):
    """The program's arguments as shapes (made here once: call from the main thread first)."""
    return _specs(self.args(knobs))

  def program(self, knobs: dict | None):
    """(f(shared, weights) → L outputs, donated argnums)."""
    if knobs is None:
      def f(xs, ws):
        return tuple(jnp.dot(x, w, preferred_element_type=jnp.float32) for x, w in zip(xs, ws))
      return f, ()
    kw = {name: knobs[name] for name in GEMV_KNOBS}
    if "impl" in knobs:
      launch = self.launch(knobs)
      if launch is None:
        raise ValueError(f"bench_decode_kernels: the Mosaic GPU GEMV takes no [{self.K}, "
                         f"{self.N}] product at block_n={knobs['block_n']} (batch 1, N a "
                         "multiple of block_n, K tiles of ≥ 64 rows).")
      tiles = dict(block_n=launch["block_n"], block_k=launch["block_k"], splits=launch["splits"],
                   pdl=knobs["impl"] == "mgpu_pdl")
      if self.op == "gemv":
        mgpu = lambda shared, w: gemv_mgpu(shared[0], w, **tiles)
      else:
        mgpu = lambda shared, w: gemv_norm_mgpu(
            shared[0], w, shared[1], shared[2] if self.addends else None, eps=self.s.norm_eps,
            **tiles)[0]
      # the split sum where the Triton rows make it, as the model does
      call = lambda shared, w: (decode_gemv.split_sum(mgpu(shared, w)) if self.sum_splits
                                else mgpu(shared, w))
    elif self.op == "gemv":
      call = lambda shared, w: decode_gemv.gemv_pallas(shared[0], w, sum_splits=self.sum_splits,
                                                       **kw)
    elif self.op == "swiglu":
      call = lambda shared, w: decode_gemv.gemv_swiglu_pallas(shared[0], w, **kw)
    else:
      call = lambda shared, w: decode_gemv.gemv_norm_pallas(
          shared[0], w, shared[1], shared[2] if self.addends else None, eps=self.s.norm_eps,
          sum_splits=self.sum_splits, **kw)[0]

    def f(shared, ws):
      return tuple(call(shared, w) for w in ws)
    return f, ()

  def carry(self, args, out):
    return args

  def output0(self, knobs, out) -> tuple:
    y = _f64(out[0])
    return (y.sum(axis=0) if y.ndim == 3 else y,)

  def reference(self, knobs, args) -> tuple:
    """The float32 XLA composition of the kernel's math on the first weight (cached per input)."""
    (key, shared), w = self._shared_inputs(knobs), args[1][0]
    if key not in self._refs:
      f32, dt = jnp.float32, jnp.bfloat16
      dot = lambda h: jnp.dot(h.astype(f32), w.astype(f32), precision=HIGHEST)
      if key[0] in ("x", "xs"):
        y = dot(shared[0])
      elif key[0] == "swiglu":
        rnd = lambda a: a.astype(dt).astype(f32)
        gu = jnp.sum(shared[0], axis=0)
        y = dot(rnd(jax.nn.silu(rnd(gu[:, :self.K])) * rnd(gu[:, self.K:])))
      else:
        r = shared[0]
        if self.addends:
          r = (r.astype(f32) + jnp.sum(shared[2], axis=0).astype(dt).astype(f32)).astype(dt)
        y = dot((rms_normalize(r, self.s.norm_eps) * shared[1].astype(f32)).astype(dt))
      self._refs[key] = (_f64(y),)
    return self._refs[key]

  def bytes_per_call(self, knobs: dict | None) -> int:
    shared = self._shared_inputs(knobs)[1][:1 if knobs is None else None]   # XLA: its one x
    return self.w_bytes + sum(a.size * a.dtype.itemsize for a in shared)

  def xla_key(self):
    return ("dot", self.batch, self.K, self.N)


# ------------------------------------------------------------------------------------- rule kind


def rule_reference_step(pos_W, rings, x_BxN, conv_w, a_log, dt_bias, S, *, s: Shapes):
  """The unfused XLA form of `gdn_decode_fused_ring_pallas` (one layer): the conv window read
  from the rings (`state_from_ring`), `short_conv_step`, the q/k L2 norms, the gates
  (`GatedDeltaNet._gates`) and `gated_delta_rule_step`. Returns (o, S', rings')."""
  f32 = jnp.float32
  B, (Hk, H, K, V), C, N = x_BxN.shape[0], (s.Hk, s.H, s.K, s.V), s.C, x_BxN.shape[1]
  pos = pos_W[0]
  f, _ = short_conv_step(x_BxN[:, :C], state_from_ring(rings, pos), conv_w)
  l2 = lambda a: (a.astype(f32) * jax.lax.rsqrt(jnp.sum(jnp.square(a.astype(f32)), -1,
                                                        keepdims=True) + s.qk_norm_eps)
                  ).astype(f.dtype)
  q = l2(f[:, :Hk * K].reshape(B, Hk, K))
  k = l2(f[:, Hk * K:2 * Hk * K].reshape(B, Hk, K))
  v = f[:, 2 * Hk * K:].reshape(B, H, V)
  a, b = x_BxN[:, N - 2 * H:N - H].astype(f32), x_BxN[:, N - H:].astype(f32)
  g = -jnp.exp(a_log.astype(f32)) * jax.nn.softplus(a + dt_bias.astype(f32))
  beta = jax.nn.sigmoid(b) * s.beta_scale
  o, S_new = gated_delta_rule_step(q, k, v, g, beta, S, scale=K ** -0.5)
  cols = (x_BxN[:, :Hk * K], x_BxN[:, Hk * K:2 * Hk * K], x_BxN[:, 2 * Hk * K:C])
  new_rings = tuple(r.at[:, pos].set(c.astype(r.dtype)) for r, c in zip(rings, cols))
  return o, S_new, new_rings


def _rule_specs(s: Shapes, batch: int, layers: int):
  """The rule programs' arguments as shapes (no 256 MB of states made to compile)."""
  sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
  B = batch
  shared = (sds((s.conv,), jnp.int32), sds((B, s.N_in), bf16), sds((s.conv, s.C), bf16),
            sds((s.H,), jnp.float32), sds((s.H,), jnp.float32))
  rings = (sds((B, s.conv, s.Hk * s.K), bf16), sds((B, s.conv, s.Hk * s.K), bf16),
           sds((B, s.conv, s.H * s.V), bf16))
  states = tuple(sds((B, s.H, s.K, s.V), bf16) for _ in range(layers))
  return shared, rings, states


class RuleCase:
  """The fused recurrent step on L distinct bf16 states (donated, updated in place)."""

  def __init__(self, s: Shapes, batch: int, layers: int, min_bytes: int):
    self.kind, self.s, self.batch = "rule", s, batch
    self.state_shape = (batch, s.H, s.K, s.V)
    self.state_bytes = math.prod(self.state_shape) * 2
    self.layers = layers or layers_for(self.state_bytes, min_bytes)
    self._ref = None

  def describe(self) -> str:
    s = self.s
    return (f"gdn_decode_fused_ring_pallas, state [{self.batch}, {s.H}, {s.K}, {s.V}] bf16, "
            f"conv width {s.conv}, x [{self.batch}, {s.N_in}]")

  def variants(self, opts: Options) -> list[dict]:
    return rule_grid(opts)

  def default(self) -> dict:
    return default_rule_knobs()

  def launch(self, knobs: dict) -> dict | None:
    bv = knobs["block_v"]
    if bv is not None and (not isinstance(bv, int) or bv < 1 or bv & (bv - 1)):
      return None
    return dict(block_v=fused_block_v(self.s.Hk, self.s.K, self.s.V, bv),
                num_warps=knobs["num_warps"])

  def specs(self, knobs):
    return _rule_specs(self.s, self.batch, self.layers)

  def args(self, knobs):
    """Fresh inputs (the same values on every call: the programs donate them)."""
    s, B, bf16 = self.s, self.batch, jnp.bfloat16
    ks = jax.random.split(jax.random.key(3), 3)
    x = _normal_jit(ks[0], (B, s.N_in), bf16, 1.0)
    conv_w = _normal_jit(ks[1], (s.conv, s.C), bf16, s.conv ** -0.5)
    rings = ring_from_state(_normal_jit(ks[2], (B, s.conv - 1, s.C), bf16, 1.0), s.Hk, s.K)
    shared = (jnp.zeros((s.conv,), jnp.int32), x, conv_w,
              jnp.log(jnp.linspace(1.0, 16.0, s.H)), jnp.linspace(-4.0, -2.0, s.H))
    states = tuple(_normal_jit(jax.random.key(2000 + i), self.state_shape, bf16, 1.0)
                   for i in range(self.layers))
    return shared, rings, states

  def program(self, knobs: dict | None):
    """(f(shared, rings, states) → (o of layer 0, states', rings'), donated argnums)."""
    s = self.s
    if knobs is None:
      step = functools.partial(rule_reference_step, s=s)
    else:
      N = s.N_in
      step = functools.partial(
          gdn_decode_fused_ring_pallas, num_heads=s.Hk, head_k_dim=s.K, scale=s.K ** -0.5,
          qk_norm_eps=s.qk_norm_eps,
          gate_columns=(N - 2 * s.H, N - s.H), beta_scale=s.beta_scale, **knobs)

    def f(shared, rings, states):
      pos, x, conv_w, a_log, dt_bias = shared
      new_states, o0 = [], None
      for S in states:
        o, S_new, rings = step(pos, tuple(rings), x, conv_w, a_log, dt_bias, S)
        o0 = o if o0 is None else o0
        new_states.append(S_new)
      return o0, tuple(new_states), tuple(rings)
    return f, (1, 2)

  def carry(self, args, out):
    return args[0], out[2], out[1]

  def output0(self, knobs, out) -> tuple:
    return _f64(out[0]), _f64(out[1][0])

  def reference(self, knobs, args) -> tuple:
    """(o, S') of layer 0 by the float32 XLA step at HIGHEST precision (before the donation)."""
    if self._ref is None:
      shared, rings, states = args
      with jax.default_matmul_precision("highest"):
        o, S_new, _ = jax.jit(functools.partial(rule_reference_step, s=self.s))(
            *shared[:1], rings, *shared[1:], states[0])
      self._ref = (_f64(o), _f64(S_new))
    return self._ref

  def bytes_per_call(self, knobs) -> int:
    s, B = self.s, self.batch
    rings = B * s.conv * s.C * 2
    return 2 * self.state_bytes + 2 * rings + B * s.N_in * 2 + s.conv * s.C * 2

  def xla_key(self):
    return ("rule", self.batch)


def make_case(kind: str, s: Shapes, opts: Options, tiny: bool):
  layers = opts.layers or (TINY["layers"] if tiny else 0)
  if kind == "rule":
    return RuleCase(s, opts.batch, opts.rule_layers or (TINY["rule_layers"] if tiny else 0),
                    opts.min_bytes)
  return GemvCase(kind, s, opts.batch, layers, opts.min_bytes)


# ---------------------------------------------------------------------------- compile and time


def compile_program(case, knobs):
  """(executable, compile s, copies in its HLO) of the L-call program of `knobs` (None: the XLA
  baseline)."""
  f, donate = case.program(knobs)
  specs = case.specs(knobs)
  t0 = time.perf_counter()
  exe = jax.jit(f, donate_argnums=donate).lower(*specs).compile()
  return exe, time.perf_counter() - t0, hlo_copies(exe)


def hlo_copies(exe) -> int | None:
  """Copies among the optimised program's kernels: copy instructions and fusions XLA named after
  a copy, outside fusion bodies. 0 expected on a GPU (a copy of a donated state or of W before a
  kernel would add its bytes to the kernel's time); interpret mode (CPU) has its own."""
  try:
    text = exe.as_text()
  except Exception:  # pylint: disable=broad-except
    return None
  fused = set(re.findall(r"calls=%?([\w.\-]+)", text))
  count, inside_fusion = 0, False
  for line in text.splitlines():
    if line.endswith("{") and not line.startswith((" ", "HloModule")):
      name = line.removeprefix("ENTRY ").split(" ")[0].lstrip("%")
      inside_fusion = name in fused
    elif not inside_fusion and re.match(
        r"\s*(ROOT\s+)?(%?\S+ = \S+ copy(-start)?\(|%?\S*copy\S* = .* fusion\()", line):
      count += 1
  return count


def relative_error(got: tuple, want: tuple) -> float:
  """max |got − want| / max |want|, the largest over the compared outputs."""
  return max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
             for g, w in zip(got, want))


def measure(exe, case, knobs, opts: Options) -> dict:
  """Warm-up call (checked against the reference), then `repeats` samples of
  `calls_per_sample` back-to-back calls."""
  repeats, calls = opts.repeats, max(1, opts.calls_per_sample)
  args = case.args(knobs)
  ref = case.reference(knobs, args)          # before the call: the rule's programs donate args
  out = jax.block_until_ready(exe(*args))
  rel = relative_error(case.output0(knobs, out), ref)
  args = case.carry(args, out)
  samples, host = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = exe(*args)
      args = case.carry(args, out)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    samples.append(time.perf_counter() - t0)
    host.append(t1 - t0)
  per_call = [t / (calls * case.layers) for t in samples]
  us = 1e6 * statistics.median(per_call)
  nbytes = case.bytes_per_call(knobs)
  return {"us": us, "us_min": 1e6 * min(per_call), "gb_s": nbytes / us * 1e-3,
          "bytes": nbytes, "rel_err": rel, "wrong": not rel <= opts.tolerance,
          "host_bound": statistics.median(h / t for h, t in zip(host, samples)) >= 0.8}


def _short(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= 600 else text[:400] + " … " + text[-190:]


def knob_text(knobs: dict | None) -> str:
  if knobs is None:
    return "xla"
  names = dict(block_n="bn", block_k="bk", min_programs="mp", num_warps="w", num_stages="st",
               block_v="bv")
  return " ".join(v if k == "impl" else f"{names.get(k, k)}{v}" for k, v in knobs.items())


class Bench:
  """The run: results, budget, and the compile pool (its threads outlive a kind whose programs
  did not all compile in time: XLA compiles cannot be interrupted)."""

  def __init__(self, opts: Options, log=print):
    self.opts, self.log = opts, log
    self.start = time.perf_counter()
    self.tiny = opts.config == "tiny"
    if self.tiny:
      opts.repeats = opts.repeats or TINY["repeats"]
    opts.repeats = opts.repeats or 20
    self.shapes = Shapes.of(opts.config)
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.compile_workers))
    self.pending = []
    self.xla_results = {}
    device = jax.devices()[0]
    out_dir = pathlib.Path(opts.out_dir or os.environ.get("OUT") or
                           pathlib.Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"bench_decode_kernels_{device_slug(device)}"
            + ("" if opts.config == "512m" else f"_{opts.config}")
            + (f"_{opts.tag}" if opts.tag else ""))
    self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    import jaxlib  # pylint: disable=import-outside-toplevel
    self.res = {"device": device.device_kind, "platform": device.platform,
                "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "options": dataclasses.asdict(opts), "shapes": dataclasses.asdict(self.shapes),
                "defaults": {"gemv": default_gemv_knobs(), "rule": default_rule_knobs()},
                "kinds": {}, "skipped": [], "xla_flags": os.environ.get("XLA_FLAGS", "")}

  def left(self) -> float:
    return self.opts.time_budget_s - (time.perf_counter() - self.start)

  def save(self):
    self.res["elapsed_s"] = round(time.perf_counter() - self.start, 1)
    self.json_path.write_text(json.dumps(self.res, indent=1, default=str) + "\n")
    self.md_path.write_text(markdown(self.res))

  def probes(self):
    """The copy bandwidth (bench_decode's probe) and the round trip of an empty call."""
    device = jax.devices()[0]
    nbytes = (1 << 30) if device.platform != "cpu" else (1 << 24)
    self.res["bandwidth_GBps"] = measure_bandwidth(nbytes) / 1e9
    self.res["bandwidth_copy_bytes"] = nbytes
    tick = jax.jit(lambda x: x + 1)
    x = jax.block_until_ready(tick(jnp.zeros((), jnp.float32)))
    times = []
    for _ in range(20):
      t0 = time.perf_counter()
      x = jax.block_until_ready(tick(x))
      times.append(time.perf_counter() - t0)
    self.res["empty_call_us"] = 1e6 * statistics.median(times)
    self.log(f"{device.device_kind}: copy bandwidth {self.res['bandwidth_GBps']:.0f} GB/s, "
             f"empty call + sync {self.res['empty_call_us']:.0f} µs")
    self.save()

  def _compile(self, case, knobs):
    try:
      return compile_program(case, knobs)
    except Exception as e:  # pylint: disable=broad-except
      return _short(e)

  def run_kind(self, kind: str, kinds_left: int):
    opts, log = self.opts, self.log
    case = make_case(kind, self.shapes, opts, self.tiny)
    variants = case.variants(opts)
    entry = {"what": case.describe(), "layers": case.layers, "calls_per_token":
             1 if kind.startswith("head") else self.shapes.num_layers,
             "default": case.default(), "xla": None, "rows": []}
    self.res["kinds"][kind] = entry
    share = self.left() / max(1, kinds_left)
    deadline = time.perf_counter() + 0.85 * share
    # One program per distinct launch (the first setting that makes it); the XLA baseline first.
    launches, first_of = [], {}
    for knobs in variants:
      launch = case.launch(knobs)
      key = (json.dumps(launch, sort_keys=True) if launch is not None
             else "invalid " + json.dumps(knobs))
      launches.append((knobs, launch, key))
      first_of.setdefault(key, knobs)
    xla_key = case.xla_key()
    t0 = time.perf_counter()
    jobs = {}
    if xla_key not in self.xla_results:
      case.specs(None)                                       # made here, not in the threads
      jobs["xla"] = self.pool.submit(self._compile, case, None)
    for key, knobs in first_of.items():
      case.specs(knobs)
      jobs[key] = self.pool.submit(self._compile, case, knobs)
    log(f"== {kind}: {case.describe()}; L = {case.layers}; {len(variants)} settings, "
        f"{len(first_of)} distinct launches; compiling (budget {0.85 * share:.0f} s)")
    concurrent.futures.wait(jobs.values(), timeout=max(1.0, deadline - time.perf_counter()))
    compiled = {}
    for key, job in jobs.items():
      if job.done():
        compiled[key] = job.result()
      else:
        job.cancel()
        self.pending.append(job)
        compiled[key] = "not compiled within the time budget"
    entry["compile_phase_s"] = round(time.perf_counter() - t0, 1)
    n_ok = sum(not isinstance(c, str) for c in compiled.values())
    log(f"   compiled {n_ok} of {len(compiled)} programs in {entry['compile_phase_s']:.0f} s")

    # The XLA baseline (shared by kinds of one shape), then the settings, default first.
    if xla_key in self.xla_results:
      entry["xla"] = self.xla_results[xla_key]
    else:
      entry["xla"] = self._row(case, None, compiled["xla"])
      self.xla_results[xla_key] = entry["xla"]
    default_us = None
    measured = {}
    for i, (knobs, launch, key) in enumerate(launches):
      if key in measured:
        row = {**entry["rows"][measured[key]], "knobs": knobs, "same_launch_as": measured[key]}
      elif self.left() <= 0:
        row = {"knobs": knobs, "launch": launch, "error": "skipped: time budget spent"}
      else:
        row = self._row(case, knobs, compiled[key], launch)
        measured[key] = i
      row["default"] = knobs == case.default()
      if row["default"] and row.get("us"):
        default_us = row["us"]
      entry["rows"].append(row)
      self.save()
      self._log_row(kind, row, default_us)
    best = min((r for r in entry["rows"] if r.get("us") and not r.get("wrong")),
               key=lambda r: r["us"], default=None)
    if best:
      log(f"   {kind} best: {knob_text(best['knobs'])} {best['us']:.2f} µs "
          f"(default {_num(default_us)} µs, XLA {_num((entry['xla'] or {}).get('us'))} µs)")

  def _row(self, case, knobs, program, launch=None) -> dict:
    row = {"knobs": knobs, "launch": launch}
    if isinstance(program, str):
      row["error"] = program
      if knobs is None:
        self.log(f"   xla baseline: {program[:200]}")
      return row
    exe, row["compile_s"], row["hlo_copies"] = program[0], round(program[1], 2), program[2]
    try:
      row.update(measure(exe, case, knobs, self.opts))
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = _short(e)
    if knobs is None:
      self.log(f"   xla baseline: " + (f"{row['us']:.2f} µs {row['gb_s']:.0f} GB/s rel err "
                                         f"{row['rel_err']:.1e}" if "us" in row
                                         else row["error"][:200]))
    return row

  def _log_row(self, kind, row, default_us):
    text = f"{kind:12s} {knob_text(row['knobs']):32s}"
    if row.get("us") is not None:
      speedup = f"x{default_us / row['us']:.2f}" if default_us else ""
      flags = ("  WRONG" if row["wrong"] else "") + ("  host-bound" if row["host_bound"] else "")
      same = f" (= row {row['same_launch_as']})" if "same_launch_as" in row else ""
      if row.get("hlo_copies") and self.res["platform"] != "cpu":
        flags += f"  {row['hlo_copies']} HLO copies"
      text += (f" {row['us']:8.2f} µs {row['gb_s']:7.0f} GB/s {speedup:6s} "
               f"rel {row['rel_err']:.1e} compile {_num(row.get('compile_s'), '.1f')} s"
               f"{flags}{same}")
    else:
      text += f" error: {row.get('error', '')[:160]}"
    self.log(text)

  def run(self) -> dict:
    opts = self.opts
    unknown = [k for k in opts.kernels if k not in KINDS]
    if unknown:
      raise ValueError(f"bench_decode_kernels: `kernels` {unknown}; expected some of {KINDS}.")
    if not 1 <= opts.batch <= decode_gemv.MAX_ROWS:
      raise ValueError(f"bench_decode_kernels: `batch`={opts.batch}; expected 1 … "
                       f"{decode_gemv.MAX_ROWS} (the GEMV's rows).")
    gemv_grid(opts)                                    # a bad --grid fails before the probes
    kinds = [k for k in opts.kernels if opts.batch == 1 or k not in BATCH_1_ONLY]
    self.res["skipped"] += [f"{k}: batch 1 only" for k in opts.kernels if k not in kinds]
    self.probes()
    for i, kind in enumerate(kinds):
      if self.left() <= 0:
        self.res["skipped"].append(f"{kind}: time budget spent")
        self.log(f"skip {kind} (time budget)")
        continue
      try:
        self.run_kind(kind, len(kinds) - i)
      except Exception as e:  # pylint: disable=broad-except
        self.res["kinds"].setdefault(kind, {"rows": []})["error"] = _short(e)
        self.log(f"{kind}: {_short(e)}")
      self.save()
    self.res["step_paths"] = step_paths(self.res)
    self.save()
    self.log(markdown(self.res))
    self.log(f"wrote {self.json_path} and .md in {time.perf_counter() - self.start:.0f} s")
    self.pool.shutdown(wait=False, cancel_futures=True)
    return self.res


# ------------------------------------------------------------------------------------- reporting


def _num(v, spec=".2f") -> str:
  return "–" if v is None else format(v, spec)


def _ok_rows(entry) -> list:
  return [r for r in entry.get("rows", []) if r.get("us") is not None and not r.get("wrong")]


def step_paths(res) -> dict:
  """Per GEMV path of a step (STEP_PATHS): the GEMV µs per token (Σ calls per token × µs) at the
  default knobs and at the best knob setting common to the path's kinds (DecodeConfig takes one
  GEMV setting for all of them)."""
  out = {}
  for path, kinds in STEP_PATHS.items():
    entries = [res["kinds"].get(k) for k in kinds]
    if any(e is None for e in entries):
      continue
    per_setting, knobs_of = [], {}
    for e in entries:
      us = {}
      for r in _ok_rows(e):
        key = json.dumps(r["knobs"], sort_keys=True)
        us.setdefault(key, r["us"])
        knobs_of.setdefault(key, r["knobs"])
      per_setting.append(us)
    common = set.intersection(*(set(u) for u in per_setting))
    totals = {k: sum(e["calls_per_token"] * u[k] for e, u in zip(entries, per_setting))
              for k in common}
    default = json.dumps(res["defaults"]["gemv"], sort_keys=True)
    ranked = sorted(totals.items(), key=lambda kv: kv[1])[:5]
    out[path] = {"kinds": list(kinds), "default_us_per_token": totals.get(default),
                 "best": [{"knobs": knobs_of[k], "us_per_token": v} for k, v in ranked],
                 "settings_timed_in_every_kind": len(common)}
  return out


def markdown(res) -> str:
  s = res["shapes"]
  o = res["options"]
  out = [f"# Decode kernels' launch knobs: {res['device']}", "",
         f"jax {res['jax']} (jaxlib {res['jaxlib']}), {res['date']}. Config {o['config']}: "
         f"D {s['D']}, heads {s['Hk']}/{s['H']}, K {s['K']}, V {s['V']}, MLP {s['F']}, vocab "
         f"{s['vocab']}, bf16; batch {o['batch']}, grid `{o['grid']}`. Copy bandwidth "
         f"{_num(res.get('bandwidth_GBps'), '.0f')} GB/s; an empty call + sync "
         f"{_num(res.get('empty_call_us'), '.0f')} µs.", "",
         "µs per kernel call: median over samples of back-to-back calls of one program that "
         "calls the kernel on L distinct weights (states), / L (cold L2; "
         "experiments/bench_decode_kernels.py). GB/s: bytes a call must move / time. "
         "× default: the default setting's time / this one's.", ""]
  paths = res.get("step_paths") or {}
  if paths:
    out += ["## One GEMV setting for the whole step", "",
            "GEMV µs per token (Σ calls per token × µs) at DecodeConfig's default and at the "
            "best settings timed in every kind of the path.", "",
            "| path | default µs/token | best µs/token | best setting |", "|---|---|---|---|"]
    for path, p in paths.items():
      best = p["best"][0] if p["best"] else None
      out.append(f"| {path} | {_num(p['default_us_per_token'], '.1f')} | "
                 f"{_num(best and best['us_per_token'], '.1f')} | "
                 f"{knob_text(best['knobs']) if best else ''} |")
    out.append("")
  out += ["## Summary", "", "| kind | L | default µs | GB/s | best µs | GB/s | × default | "
          "best setting | XLA µs | settings (timed / errors / wrong) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for kind, e in res["kinds"].items():
    rows = e.get("rows", [])
    ok = _ok_rows(e)
    d = next((r for r in rows if r.get("default") and r.get("us") is not None), None)
    b = min(ok, key=lambda r: r["us"], default=None)
    x = e.get("xla") or {}
    n_err = sum(1 for r in rows if r.get("error"))
    n_wrong = sum(1 for r in rows if r.get("wrong"))
    out.append(f"| {kind} | {e.get('layers', '')} | {_num(d and d['us'])} | "
               f"{_num(d and d['gb_s'], '.0f')} | {_num(b and b['us'])} | "
               f"{_num(b and b['gb_s'], '.0f')} | "
               f"{_num(d and b and d['us'] / b['us'])} | {knob_text(b['knobs']) if b else ''} | "
               f"{_num(x.get('us'))} | {len(rows) - n_err} / {n_err} / {n_wrong} |")
  for kind, e in res["kinds"].items():
    out += ["", f"## {kind}", "", f"{e.get('what', '')}; L = {e.get('layers', '?')}."]
    if e.get("error"):
      out.append(f"Error: {e['error'][:300]}")
    rows = e.get("rows", [])
    d = next((r for r in rows if r.get("default") and r.get("us") is not None), None)
    x = e.get("xla") or {}
    out += ["", f"Default ({knob_text(e.get('default'))}): "
            + (f"{d['us']:.2f} µs, {d['gb_s']:.0f} GB/s" if d else "not timed") + ". XLA: "
            + (f"{x['us']:.2f} µs, {x['gb_s']:.0f} GB/s" if x.get("us") is not None
               else (x.get("error") or "not timed")[:200].replace("|", "/")) + "."]
    best, seen = [], set()
    for r in sorted(_ok_rows(e), key=lambda r: r["us"]):
      key = json.dumps(r.get("launch"), sort_keys=True)
      if key not in seen:
        seen.add(key)
        best.append(r)
    if best:
      out += ["", "| setting | launch | µs | min µs | GB/s | × default | rel err |",
              "|---|---|---|---|---|---|---|"]
      for r in best[:5]:
        launch = r.get("launch") or {}
        out.append(f"| {knob_text(r['knobs'])} | {knob_text(launch)} | {r['us']:.2f} | "
                   f"{r['us_min']:.2f} | {r['gb_s']:.0f} | {_num(d and d['us'] / r['us'])} | "
                   f"{r['rel_err']:.1e} |")
    default = e.get("default") or {}
    if default and rows:       # one knob at a time around the default
      lines = []
      for name in default:
        points = {}
        for r in rows:
          k = r["knobs"]
          if (r.get("us") is not None and set(k) == set(default)
              and all(k[n] == default[n] for n in default if n != name)):
            points.setdefault(k[name], r["us"])
        if len(points) > 1:
          bold = lambda v, text: f"**{text}**" if v == default[name] else text
          lines.append(f"- {name}: " + ", ".join(
              bold(v, f"{v}: {us:.2f}")
              for v, us in sorted(points.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))))
      if lines:
        out += ["", "One knob at a time around the default (µs; the default in bold):"] + lines
    errors = {}
    for r in rows:
      if r.get("error"):
        errors.setdefault(r["error"][:160], []).append(knob_text(r["knobs"]))
    if errors:
      out += ["", "Errors:"] + [f"- {', '.join(ks[:4])}{' …' if len(ks) > 4 else ''} "
                                f"({len(ks)}): {msg.replace('|', '/')}"
                                for msg, ks in errors.items()]
    copies = [r for r in rows if r.get("hlo_copies") and "same_launch_as" not in r]
    if copies and res.get("platform") != "cpu":       # interpret mode makes its own copies
      out += ["", "Programs with copies in their optimised HLO (time includes them): " + "; ".join(
          f"{knob_text(r['knobs'])} ({r['hlo_copies']})" for r in copies[:10])]
    wrong = [r for r in rows if r.get("wrong")]
    if wrong:
      out += ["", "Wrong (rel err above tolerance): " + "; ".join(
          f"{knob_text(r['knobs'])} {r['rel_err']:.1e}" for r in wrong[:10])]
  if res.get("skipped"):
    out += ["", "Skipped: " + "; ".join(res["skipped"])]
  return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- main


def run(opts: Options, log=print) -> dict:
  return Bench(opts, log).run()


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  ints = lambda s: tuple(int(x) for x in s.split(",") if x)
  opts = Options(config=f.config, kernels=tuple(x for x in f.kernels.split(",") if x),
                 batch=f.batch, grid=f.grid, block_n=ints(f.block_n), block_k=ints(f.block_k),
                 min_programs=ints(f.min_programs), num_warps=ints(f.num_warps),
                 num_stages=ints(f.num_stages), rule_block_v=ints(f.rule_block_v),
                 rule_num_warps=ints(f.rule_num_warps),
                 gemv_impls=tuple(x for x in f.gemv_impls.split(",") if x),
                 min_bytes=f.min_bytes, layers=f.layers,
                 rule_layers=f.rule_layers, repeats=f.repeats,
                 calls_per_sample=f.calls_per_sample, compile_workers=f.compile_workers,
                 time_budget_s=f.time_budget_s, tolerance=f.tolerance, out_dir=f.out_dir,
                 tag=f.tag)
  bench = Bench(opts, log=lambda *a: print(*a, flush=True))
  bench.run()
  if any(not job.done() for job in bench.pending):
    # XLA compiles cannot be interrupted, and the interpreter would wait for their threads at
    # exit: the results are written, so leave now.
    print(f"{sum(not j.done() for j in bench.pending)} compiles still running; exiting without "
          "waiting for them", flush=True)
    sys.stdout.flush()
    os._exit(0)


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = Options()
  join = lambda t: ",".join(map(str, t))
  flags.DEFINE_enum("config", d.config, ["512m", "tiny"], "Model shapes (bench_decode.CONFIGS); "
                    "tiny: a CPU smoke run (L = 2, 2 repeats).")
  flags.DEFINE_string("kernels", join(d.kernels), f"Comma-separated kinds, run in this order: "
                      f"{join(KINDS)}.")
  flags.DEFINE_integer("batch", d.batch, "Rows of x (≤ 8; the norm and SwiGLU kinds: 1 only).")
  flags.DEFINE_enum("grid", d.grid, ["oat", "small", "full"], "GEMV settings: one knob at a time "
                    "around the default; that plus a 32-setting product; the product of the lists.")
  flags.DEFINE_string("block_n", join(d.block_n), "GEMV column blocks.")
  flags.DEFINE_string("block_k", join(d.block_k), "GEMV K tiles.")
  flags.DEFINE_string("min_programs", join(d.min_programs), "GEMV least program counts.")
  flags.DEFINE_string("num_warps", join(d.num_warps), "GEMV warps per program.")
  flags.DEFINE_string("num_stages", join(d.num_stages), "GEMV Triton pipelining stages.")
  flags.DEFINE_string("rule_block_v", join(d.rule_block_v), "Rule kernel V blocks.")
  flags.DEFINE_string("rule_num_warps", join(d.rule_num_warps), "Rule kernel warps.")
  flags.DEFINE_string("gemv_impls", join(d.gemv_impls), f"Comma-separated implementations of "
                      f"the plain and norm GEMV kinds, of {GEMV_IMPLS} (Mosaic GPU: default tiles, "
                      "64 columns, ≥ 264 and ≥ 132 programs; batch 1).")
  flags.DEFINE_integer("min_bytes", d.min_bytes, "Distinct weight (state) bytes per program.")
  flags.DEFINE_integer("layers", d.layers, "L of the GEMV programs (0: from --min_bytes).")
  flags.DEFINE_integer("rule_layers", d.rule_layers, "L of the rule programs (0: from "
                       "--min_bytes).")
  flags.DEFINE_integer("repeats", d.repeats, "Timed samples per setting (0: 20; tiny: 2).")
  flags.DEFINE_integer("calls_per_sample", d.calls_per_sample, "Back-to-back calls per sample.")
  flags.DEFINE_integer("compile_workers", d.compile_workers, "Programs compiled at once.")
  flags.DEFINE_float("time_budget_s", d.time_budget_s, "Stop compiling and timing after this.")
  flags.DEFINE_float("tolerance", d.tolerance, "Rel err above which a row is marked wrong.")
  flags.DEFINE_string("out_dir", "", "Output folder (default: $OUT, else experiments/results).")
  flags.DEFINE_string("tag", "", "Suffix of the output files' names.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
