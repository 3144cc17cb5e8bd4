"""Kernel settings as values: frozen dataclasses passed as static arguments, so that a change recompiles.

A setting read from a module global while tracing is invisible to the jit cache (changing it after a
compile silently keeps the old kernel); these values are hashed into it instead. `None` fields take
the per-shape default of `GpuConfig.resolve`, the one place where those defaults live. Timings
behind each default: `NOTES_gpu.md` (H100, bf16, C = 64).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

GEMV_MAX_ROWS = 8   # the largest batch the decode GEMV takes (decode_gemv.MAX_ROWS)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """Launch settings of the GPU (Triton) kernels; `resolve` fills the `None` fields for a shape.

  walk_block_v: V columns per program of the two state walks. None: 64, or 32 for K > 128 (the
    K×BV state tiles and C×K operands must fit the H100's 227 KB of shared memory), then halved down
    to 16 while the walks have fewer than `walk_min_programs` programs (B·H·V/BV): each walk is
    sequential over chunks, so at small B·H the GPU needs more of them in flight. B2 T8192 H16:
    fwd+bwd 2.42 ms at 128 (BV 32) against 2.78 at 256 (BV 16) in one run (`_v8_t8192`).
  walk_num_stages: Triton software-pipelining depth of the walks' chunk loop (chunk r+1, r+2 load
    while chunk r multiplies). None: 3, or 2 for K > 128 (three stages of C×256 tiles exceed shared
    memory). B16 T4096: 7.84 / 8.28 ms at 3 / 2 stages (`_v8_b16`).
  part_block_v: V columns per step of the prep, output and dṼ^local kernels' V loops.
  part_num_warps: warps of the forward's prep and output kernels (8: B16 9.54 vs 8.28 ms).
  prep_block: 0, or the row block b of the prep's blocked UT transform (a power of two ≥ 16; b ≥ C
    is one block). 0: A = (I + L)⁻¹ by masked doubling on the whole C×C tile, 2 (log₂C − 1) C×C
    TF32 products (10 at C = 64). b: L, A, W and U in b×b blocks of the lower triangle, A by block
    forward substitution (`gpu/prep.py`): at C = 64, b = 16 the inverse takes ~1/16 of the
    multiply-adds, and KKᵀ, W, U skip the upper blocks.
  dv_local_num_warps: warps of the backward's dṼ^local kernel.
  grads_block_k: K columns per program of the key-gradients kernel (< K: K split over programs;
    BK = 64 at K = 128: 3.25-3.39 ms against 3.66-3.71 for 128 at 8 warps, `_v5*`).
  grads_block_v: V columns per step of both gradients kernels' V loops (a `fori_loop` when V is
    wider; unrolled, every block's tiles were live at once and the K = 256, V = 512 key kernel spilled:
    3.88 vs 1.59 ms, `_v8_k256d`), and the column blocks of dk in the WY-gradients kernel.
  grads_key_num_warps: warps of the key-gradients kernel. None: 4, or 8 for K > 128 (K = 256,
    V = 512 fwd+bwd 5.69 against 6.21 ms at 4 warps, `_v8_k256c`).
  grads_wy_num_warps: warps of the WY-gradients kernel.
  walk_bwd_from_a: the reverse walk forms Wᵀ dṼ as (diag(βd) K)ᵀ (Aᵀ dṼ) from A (C×C) and the k it
    reads anyway, instead of reading W (C×K); the forward then keeps no W for the backward. One
    more C×C×BV product per chunk on the walk's chain, C×K fewer bytes per chunk loaded and staged
    (at K = 256 the staged tiles of BV = 64 then fit two pipeline stages in shared memory).
  walk_fwd_from_a: the forward walk forms Ṽ = A (diag(β) V − diag(βd) K h) from A (C×C), v and
    the k it reads anyway, instead of U − W h from W (C×K) and U (C×V), so the prep writes no U
    (and, with `walk_bwd_from_a` too, no W: A is the prep's only output, as fla's kkt + solve).
    One more C×C×BV product per chunk on the walk's chain; per chunk the walk stages A, k and a
    V-block of v instead of W, k and U.
  walk_fwd_output: the forward walk also forms each chunk's output,
    O_r = scale (diag(d) Q_r h_r + ((Q_r K_rᵀ) ⊙ Γ_r) Ṽ_r), for its V-block, from the state and Ṽ
    it holds, so no output kernel reads h_r and Ṽ back; and a forward that is not differentiated
    (inference, evaluation) writes neither h_r nor Ṽ. Costs Q Kᵀ (C×C×K, repeated by each of the
    V/BV programs of a head) and two more products per chunk on the walk, and a q tile per
    pipeline stage.
  walk_bwd_dv_local: the reverse walk forms dṼ^local = scale ((Q Kᵀ) ⊙ Γ)ᵀ dO for its V-block
    from the q, k and dO tiles it loads anyway, so no dṼ^local kernel writes it for the walk to
    read back. Costs Q Kᵀ (C×C×K, repeated by each of the V/BV programs of a head) and one
    C×C×BV product per chunk, off the dh chain.
  interpret: run the kernels in the Pallas interpreter. None: on CPU (tests), compiled elsewhere.
  """
  walk_block_v: int | None = None
  walk_min_programs: int = 128
  walk_num_warps: int = 4
  walk_num_stages: int | None = None
  part_block_v: int = 64
  part_num_warps: int = 4
  prep_block: int = 0
  dv_local_num_warps: int = 4
  grads_block_k: int = 64
  grads_block_v: int = 128
  grads_key_num_warps: int | None = None
  grads_wy_num_warps: int = 4
  walk_bwd_from_a: bool = False
  walk_fwd_from_a: bool = False
  walk_fwd_output: bool = False
  walk_bwd_dv_local: bool = False
  interpret: bool | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "interpret" or isinstance(field.default, bool):   # the switches
        if not isinstance(value, bool) and (value is not None or field.default is not None):
          raise ValueError(f"GpuConfig: `{field.name}`={value!r}; expected True, False"
                           + (" or None." if field.default is None else "."))
      elif value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
        raise ValueError(f"GpuConfig: `{field.name}`={value!r}; expected a non-negative int"
                         + (" or None (the per-shape default)." if field.default is None else "."))
    b = self.prep_block
    if b and (b < 16 or b & (b - 1)):
      raise ValueError(f"GpuConfig: `prep_block`={b}; expected 0 (no blocks) or a power of two "
                       "≥ 16 (Triton's smallest matmul tile), e.g. 16.")

  @classmethod
  def parse(cls, spec: str) -> GpuConfig:
    """A GpuConfig from "field=value,..." (ints; True / False; None for a per-shape default):
    the command-line and ModelConfig form, e.g. "walk_fwd_output=True,walk_block_v=64". "" is
    the defaults. ValueError naming the item and the fields."""
    if not isinstance(spec, str):
      raise ValueError(f"GpuConfig spec {spec!r}; expected a string 'field=value,...'.")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
      name, sep, text = (x.strip() for x in item.partition("="))
      if not sep or name not in fields or name in values:
        raise ValueError(f"GpuConfig spec {spec!r}: {item!r} is not field=value with a GpuConfig "
                         f"field named once; fields: {sorted(fields)}.")
      if text in ("None", "True", "False"):
        values[name] = {"None": None, "True": True, "False": False}[text]
      elif re.fullmatch(r"-?[0-9]+", text):
        values[name] = int(text)
      else:
        raise ValueError(f"GpuConfig spec {spec!r}: {item!r} has the value {text!r}; expected "
                         "an int, True, False or None.")
    return cls(**values)

  @property
  def prep_writes_w(self) -> bool:
    """Whether a walk reads W (the forward walk, or the reverse walk, unless from A)."""
    return not (self.walk_fwd_from_a and self.walk_bwd_from_a)

  @property
  def prep_writes_u(self) -> bool:
    """Whether the forward walk reads U (not when it forms Ṽ from A)."""
    return not self.walk_fwd_from_a

  def resolve(self, B: int, H: int, K: int, V: int) -> GpuConfig:
    """This config with every `None` replaced by its default for B·H value heads and head dims K, V
    (see the field docs); explicit values are kept (block sizes capped at the head dim).
    Idempotent: a resolved config resolves to itself."""
    large_k = K > 128
    BV = self.walk_block_v
    if BV is None:
      BV = min(V, 32 if large_k else 64)
      while BV > 16 and B * H * (V // BV) < self.walk_min_programs:
        BV //= 2
    return dataclasses.replace(
        self, walk_block_v=min(V, BV),
        walk_num_stages=(2 if large_k else 3) if self.walk_num_stages is None
        else self.walk_num_stages,
        grads_key_num_warps=(8 if large_k else 4) if self.grads_key_num_warps is None
        else self.grads_key_num_warps,
        interpret=(jax.default_backend() == "cpu") if self.interpret is None else self.interpret)


# The decode step's GEMV products that `DecodeConfig.gemv_overrides` can set apart (its docstring).
GEMV_PRODUCTS = ("in_proj", "out_proj", "mlp_in", "mlp_out", "head")
# gemv_overrides' setting keys → the GEMV kernels' keyword arguments (`DecodeConfig.gemv_launch`).
GEMV_OVERRIDE_KEYS = {"bn": "block_n", "bk": "block_k", "mp": "min_programs", "w": "num_warps",
                      "st": "num_stages"}
_GEMV_OVERRIDES_FORM = ("expected 'PRODUCT=KEYN[,KEYN…][;PRODUCT=…]' (N an unsigned int) with "
                        f"PRODUCT in {', '.join(GEMV_PRODUCTS)} and KEY in bn (block_n), "
                        "bk (block_k), mp (min_programs), w (num_warps), st (num_stages), each "
                        "at most once, e.g. 'out_proj=bn32,mp128;mlp_out=st3,w8'")


# What each GEMV launch setting must be: (test of an int, the requirement in words).
_GEMV_SETTING_RULES = {
    "block_n": (lambda v: v >= 16 and not v & (v - 1), "a power of two ≥ 16 (Triton blocks)"),
    "block_k": (lambda v: v >= 16 and not v & (v - 1), "a power of two ≥ 16 (Triton blocks)"),
    "min_programs": (lambda v: v >= 1, "an int ≥ 1 (e.g. twice the GPU's SM count)"),
    "num_warps": (lambda v: v in (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16"),
    "num_stages": (lambda v: v >= 1, "an int ≥ 1 (Triton's pipelining depth)"),
}


def _gemv_setting_problem(kwarg: str, value) -> str | None:
  """None where a GEMV launch setting (`DecodeConfig.gemv_launch`'s keyword `kwarg`) is an int
  the kernels take, else what it must be."""
  ok, requirement = _GEMV_SETTING_RULES[kwarg]
  return None if not isinstance(value, bool) and isinstance(value, int) and ok(value) else (
      requirement)


def parse_gemv_overrides(spec: str) -> dict[str, dict[str, int]]:
  """`DecodeConfig.gemv_overrides` text → {product: {GEMV keyword: value}}, e.g.
  "out_proj=bn32,mp128;mlp_out=st3" → {'out_proj': {'block_n': 32, 'min_programs': 128},
  'mlp_out': {'num_stages': 3}}; "" → {}. ValueError naming `gemv_overrides`, the bad part and
  the expected form on anything else (malformed text, an unknown or repeated product or key, a
  value the kernels refuse)."""
  if not isinstance(spec, str):
    raise ValueError(f"DecodeConfig: `gemv_overrides`={spec!r}; {_GEMV_OVERRIDES_FORM} (a str; "
                     "'' for none).")
  overrides = {}
  if not spec.strip():
    return overrides
  bad = lambda part, why: ValueError(f"DecodeConfig: `gemv_overrides`={spec!r}: {part!r} {why}; "
                                     f"{_GEMV_OVERRIDES_FORM}.")
  for entry in spec.split(";"):
    product, eq, settings = (t.strip() for t in entry.partition("="))
    if not entry.strip():
      raise bad(entry, "is an empty entry (a stray ';')")
    if not eq or not product or not settings:
      raise bad(entry, "is not PRODUCT=SETTINGS")
    if product not in GEMV_PRODUCTS:
      raise bad(product, "is not a GEMV product")
    if product in overrides:
      raise bad(product, "is repeated")
    launch = overrides[product] = {}
    for setting in settings.split(","):
      setting = setting.strip()
      match = re.fullmatch(r"([a-z]+)([0-9]+)", setting)
      if match is None:
        raise bad(setting, f"(of {product}) is not KEY then an unsigned int")
      key, value = match.group(1), int(match.group(2))
      if key not in GEMV_OVERRIDE_KEYS:
        raise bad(setting, f"(of {product}) has an unknown key {key!r}")
      kwarg = GEMV_OVERRIDE_KEYS[key]
      if kwarg in launch:
        raise bad(setting, f"(of {product}) repeats the key {key!r}")
      problem = _gemv_setting_problem(kwarg, value)
      if problem is not None:
        raise bad(setting, f"(of {product}) sets {kwarg}={value}, which must be {problem}")
      launch[kwarg] = value
  return overrides


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Launch settings of the decode-step kernels (`decode_step.py`, `decode_fused.py`), passed as
  `generate(..., decode_config=...)`; the GEMV settings tuned on an H100 (experiments/NOTES_decode.md).

  block_v: V columns per (batch, head) program. None: `decode_step.default_block_v` (a [K, BV]
    float32 state tile of ≤ 8K elements; 32 at K = 256: 96 programs at batch 1 with 6 heads and
    V = 512). The fused kernel halves it until it divides the q | k channels (2·Hk·K).
  num_warps: warps per program.
  gemv: the step's weight products as Pallas GEMV kernels (`decode_gemv.py`: W read in
    [gemv_block_k, gemv_block_n] tiles, K split until there are ≥ gemv_min_programs programs,
    gemv_num_warps warps each) instead of XLA's products on `matmul_rows` padded rows. True: at
    batch ≤ 8 on any backend (the interpreter on CPU); False: never; None (default): at batch 1 on
    GPUs only, where it is faster than XLA's padded GEMM (at batch 8 it is not;
    experiments/NOTES_decode.md). `use_gemv` says which.
  gemv_swiglu: where the MLP's products both go through the GEMV at batch 1, the second one sums
    the first one's split partials and makes SiLU(gate) ⊙ up as it reads its input
    (`decode_gemv.gemv_swiglu_pallas`: no kernel between the two products); False: the product,
    an XLA SiLU product, the product.
  gemv_norm: where a pre-norm block's products go through the GEMV at batch 1, the residual add
    and the RMSNorm before a product are made in its prologue (`decode_gemv.gemv_norm_pallas`):
    the mixer's norm in the in-projection's GEMV, the mixer output's residual add and the MLP's
    norm in the gate/up GEMV, the final norm in the read-out's (`use_gemv_norm`; GDN blocks);
    False: XLA's norm and add kernels between the GEMVs.
  gemv_out_norm: where a GDN mixer's output product W_o goes through the GEMV at batch 1, its gated
    output norm (RMSNorm_V of the rule's output per head, the gain, SiLU(gate)) is made in W_o's
    GEMV prologue (`decode_gemv.gemv_gated_norm_pallas`: no XLA kernel between the rule's kernel
    and W_o's GEMV; `use_gemv_out_norm`), where the head dim V is a multiple of out_proj's K tile
    (else the unfused norm; timed faster on an H100, experiments/NOTES_decode.md);
    False: XLA's norm kernel before the GEMV.
  The three below are on by default since they were timed faster together on an H100
  (experiments/NOTES_decode.md, session 33). The two atomic ones make decoding on a GPU not
  bit-reproducible (float32 sums in a varying order; rarely a different bf16 rounding, so a
  greedy token can differ at a near-tie); `DecodeConfig(gemv_out_atomic=False,
  gemv_down_atomic=False)` is the reproducible path.
  gemv_in_partials: where a GDN mixer's in-projection goes through the GEMV at batch 1 and the step
    runs the fused ring kernel (`generate`'s impl "pallas_fused"), the GEMV's float32 split
    partials go unsummed to their consumers, each of which sums the partials of the columns it
    reads (with the projections' multipliers, rounded as the unfused step): the ring kernel
    (q | k | v, W_a x, W_b x) and, with the mixer's gate, W_o's gated-norm prologue (so only
    where that prologue is used, `gemv_out_norm`). No XLA kernel sums the partials between the
    in-projection and the rule. False: XLA sums them.
  gemv_out_atomic: where a GDN block makes its norms in the GEMV prologues at batch 1
    (`gemv_norm`), W_o's GEMV programs add their split partials atomically into float32 zeros
    that the in-projection's GEMV makes (`decode_gemv`'s `accumulator` / `zeros_out`), so the
    gate/up prologue reads one summed addend instead of re-reading all W_o's partials in every
    program (where D is a multiple of out_proj's block_n; else the partials). The order of the
    float32 additions then varies from run to run on a GPU: the sum's last bits, and rarely a
    bf16 rounding of it, are not reproducible. False: the partials (deterministic).
  gemv_down_atomic: likewise for every GDN block's MLP down product (the chained GEMVs): its
    programs add their partials atomically into zeros that the gate/up GEMV makes, and the
    block's output is added to the stream in the next GEMV's prologue (the next block's
    in-projection, or the read-out's final norm; `model.Block.step_deferred`), so no XLA kernel
    sums the down partials and adds the residual between two layers. Same reproducibility
    caveat; False: XLA's sum and add.
  gemv_backend: "triton" (the Pallas-Triton GEMVs, `decode_gemv`) or "mosaic": at batch 1 on
    the fused-norm path (`gemv_norm`), the GDN blocks' and the read-out's GEMVs run as Pallas
    Mosaic GPU kernels (`decode_gemv_mgpu`: W's tiles TMA-loaded before waiting for the previous
    kernel, programmatic dependent launch), where their shapes allow (N a multiple of block_n:
    `generate` pads the in-projection's columns; a tied read-out stays Triton). Hopper only;
    the atomic sums (`gemv_out_atomic`, `gemv_down_atomic`) do not apply to it (its kernels have
    none yet). Slower than the Triton GEMVs in the step so far (experiments/NOTES_decode.md):
    off by default.
  gemv_num_stages: Triton's software-pipelining depth of the GEMVs' K-tile loop.
  gemv_overrides: per-product GEMV launch settings, each in place of its global field
    (gemv_block_n, gemv_block_k, gemv_min_programs, gemv_num_warps, gemv_num_stages) for one
    product ("": the global ones everywhere; `gemv_launch_for`). The products, with the kernel
    each runs in:
      in_proj   the mixer's fused in-projection: a GDN mixer's q | k | v | gate | a | b [D, N_in]
                (gemv_pallas; at batch 1 with gemv_norm, gemv_norm_pallas with the mixer's norm),
                an attention mixer's q | k | v (| gate) (gemv_pallas);
      out_proj  the mixer's output projection: a GDN mixer's W_o [H·V, D] (gemv_pallas; at batch 1
                with gemv_out_norm, gemv_gated_norm_pallas with the gated output norm; with
                gemv_norm its split partials are handed unsummed to mlp_in's prologue, which reads
                however many there are), an attention mixer's (gemv_pallas);
      mlp_in    every block's MLP gate | up [D, 2F] (gemv_pallas, or gemv_norm_pallas with the residual
                add and the MLP's norm; with gemv_swiglu its split partials go to mlp_out, which
                takes a power of two of them: any other count is summed by XLA first);
      mlp_out   every block's MLP down [F, D] (gemv_swiglu_pallas when chained, else gemv_pallas);
      head      the read-out [D, vocab] or the tied [vocab, D] (gemv_pallas, or gemv_norm_pallas
                with the final norm).
    Form: entries PRODUCT=SETTINGS joined by ';', SETTINGS a ','-joined list of a key
    and an unsigned int each: bn (block_n, a power of two ≥ 16), bk (block_k, likewise), mp
    (min_programs ≥ 1), w (num_warps: 1, 2, 4, 8, 16), st (num_stages ≥ 1); a product or a key at
    most once. E.g. "out_proj=bn32,mp128;mlp_out=st3,w8": W_o in 32-column tiles split until
    ≥ 128 programs, the down product with 3 stages and 8 warps, everything else as gemv_*.
  The GEMV defaults (128-column tiles, ≥ 528 programs, all three norms in the prologues) are the
  fastest of the settings timed in the whole decode step (experiments/NOTES_decode.md).
  conv_ring: `generate` with impl "pallas_fused" keeps the conv states as rings in the decode loop
    (`decode_fused.gdn_decode_fused_ring_pallas`: no window concatenated and no state sliced per
    layer and token); False: the window kernel.
  """
  block_v: int | None = None
  num_warps: int = 4
  gemv: bool | None = None
  gemv_block_n: int = 128
  gemv_block_k: int = 128
  gemv_min_programs: int = 528
  gemv_num_warps: int = 4
  gemv_num_stages: int = 2
  gemv_swiglu: bool = True
  gemv_norm: bool = True
  gemv_out_norm: bool = True
  gemv_in_partials: bool = True
  gemv_out_atomic: bool = True
  gemv_down_atomic: bool = True
  gemv_backend: str = "triton"
  conv_ring: bool = True
  gemv_overrides: str = ""

  def __post_init__(self):
    for name in ("gemv_swiglu", "gemv_norm", "gemv_out_norm", "gemv_in_partials",
                 "gemv_out_atomic", "gemv_down_atomic", "conv_ring"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"DecodeConfig: `{name}`={getattr(self, name)!r}; expected True or "
                         "False.")
    if self.gemv is not None and not isinstance(self.gemv, bool):
      raise ValueError(f"DecodeConfig: `gemv`={self.gemv!r}; expected None (batch 1 on GPUs), "
                       "True or False.")
    for kwarg in ("block_n", "block_k", "min_programs", "num_stages"):   # warps: below
      value = getattr(self, "gemv_" + kwarg)
      if (problem := _gemv_setting_problem(kwarg, value)) is not None:
        raise ValueError(f"DecodeConfig: `gemv_{kwarg}`={value!r}; expected {problem}.")
    if self.block_v is not None and (isinstance(self.block_v, bool) or not isinstance(
        self.block_v, int) or self.block_v < 1 or self.block_v & (self.block_v - 1)):
      raise ValueError(f"DecodeConfig: `block_v`={self.block_v!r}; expected None or a power of "
                       "two (Triton blocks).")
    for name in ("num_warps", "gemv_num_warps"):
      if getattr(self, name) not in (1, 2, 4, 8, 16):
        raise ValueError(f"DecodeConfig: `{name}`={getattr(self, name)!r}; expected 1, 2, 4, 8 "
                         "or 16.")
    parse_gemv_overrides(self.gemv_overrides)
    if self.gemv_backend not in ("triton", "mosaic"):
      raise ValueError(f"DecodeConfig: `gemv_backend`={self.gemv_backend!r}; expected 'triton' "
                       "or 'mosaic'.")

  @staticmethod
  def or_default(decode_config: "DecodeConfig | None") -> "DecodeConfig":
    """`decode_config`, or the defaults for None (what every decode function's
    `decode_config=None` means)."""
    return DecodeConfig() if decode_config is None else decode_config

  @property
  def gemv_launch(self) -> dict:
    """The GEMV kernels' tile, split, warp and stage keyword arguments (`decode_gemv`)."""
    return dict(block_n=self.gemv_block_n, block_k=self.gemv_block_k,
                min_programs=self.gemv_min_programs, num_warps=self.gemv_num_warps,
                num_stages=self.gemv_num_stages)

  def gemv_launch_for(self, product: str | None) -> dict:
    """The GEMV keyword arguments of one product of the step (`GEMV_PRODUCTS`): `gemv_launch`
    with that product's `gemv_overrides` in place of the global values (None: `gemv_launch`).
    ValueError naming the products on any other name."""
    if product is None:
      return self.gemv_launch
    if product not in GEMV_PRODUCTS:
      raise ValueError(f"DecodeConfig.gemv_launch_for: product {product!r}; expected one of "
                       f"{', '.join(GEMV_PRODUCTS)}.")
    return {**self.gemv_launch, **parse_gemv_overrides(self.gemv_overrides).get(product, {})}

  def use_gemv(self, batch: int, backend: str | None = None, contract_dim: int | None = None
               ) -> bool:
    """Whether a decode step's weight product at this batch goes through the Pallas GEMV (`gemv`;
    the kernel takes at most GEMV_MAX_ROWS rows). The default (None) also leaves a product whose
    contracted dim has no power-of-two factor ≥ 16 (the compiled kernel's K tile) to XLA;
    `gemv=True` hands it to the kernel, which refuses it."""
    if batch > GEMV_MAX_ROWS or self.gemv is False:
      return False
    if self.gemv:
      return True
    tileable = contract_dim is None or (contract_dim & -contract_dim) >= 16
    return (batch == 1 and tileable
            and (backend or jax.default_backend()) in ("gpu", "cuda", "rocm"))

  def use_gemv_norm(self, batch: int, contract_dim: int, backend: str | None = None) -> bool:
    """Whether a product at this batch, contracting a normed residual stream of width
    `contract_dim`, makes the norm (and the residual add) in its GEMV's prologue (`gemv_norm`):
    batch 1 on the GEMV path only."""
    return (self.gemv_norm and batch == 1
            and self.use_gemv(1, backend, contract_dim=contract_dim))

  def use_gemv_out_norm(self, batch: int, contract_dim: int, backend: str | None = None) -> bool:
    """Whether a GDN mixer's output product at this batch, contracting H·V = `contract_dim`,
    makes the gated output norm in its GEMV's prologue (`gemv_out_norm`): batch 1 on the GEMV
    path only (the caller also checks that V is a multiple of out_proj's K tile)."""
    return (self.gemv_out_norm and batch == 1
            and self.use_gemv(1, backend, contract_dim=contract_dim))


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  """Settings of the Mosaic TPU kernels.

  interpret: False compiles for the TPU; True or a `pltpu.InterpretParams(...)` runs the Pallas
    interpreter (CPU tests; `InterpretParams(random_seed=s)` runs parallel grid axes in a random order).
  dimension_semantics: Mosaic's semantics of the grid (B, H, N chunks). The chunk axis carries the
    state across grid steps and must stay "arbitrary" (sequential); the tests set it to "parallel"
    once, to show that the random-order interpreter catches that mistake.
  """
  interpret: Any = False
  dimension_semantics: tuple[str, str, str] = ("parallel", "parallel", "arbitrary")
