r"""Chunked gated delta rule on NVIDIA GPUs: Pallas (Triton lowering) kernels, fla's decomposition.

Everything that does not depend on the carry-in state runs once per chunk, in parallel over all
chunks; two kernels walk the chunks in order doing only the state recursion (symbols as in
`chunk_math` and `gdn_jax.ops.chunked`; one file per stage, `chunk.py` wires them):

  forward  prep (`prep.py`, `gdn_prep`, grid (B, H, N)): γ, Γ, A = (I+L)⁻¹ (fp32), W = A diag(βd) K,
           U = A diag(β) V; walk (`walks.py`, `gdn_walk_fwd`, grid (V/BV, B, H)):
           Ṽ_r = U_r − W_r h_r,  h_{r+1} = λ_r h_r + K_rᵀ diag(w_r) Ṽ_r  (two C×K×BV matmuls per
           chunk; w_r, λ_r from the chunk's g inside the loop, k read in token layout), writing
           Ṽ and h_r (bf16 for bf16 inputs, as fla); output (`output.py`, `gdn_output`, grid
           (B, H, N)): O = scale (diag(d) Q h_r + ((Q Kᵀ) ⊙ Γ) Ṽ). The forward keeps the inputs, A,
           W, h_r and Ṽ: no per-token state. Opt-in (`GpuConfig`): the walk forms Ṽ from A and v
           (`walk_fwd_from_a`: no U), and O itself (`walk_fwd_output`: no output kernel).
  backward dṼ^local = scale Pᵀ dO (`output.py`, `gdn_dv_local`); the reverse walk (`walks.py`,
           `gdn_walk_bwd`, W as the forward stored it, q, k, g, dO in token layout):
           dṼ_r = dṼ_r^local + diag(w_r) K_r dh_{r+1},
           dh_r = λ_r dh_{r+1} + scale Q_rᵀ diag(d_r) dO_r − W_rᵀ dṼ_r (writes dh_{r+1} and dṼ per
           chunk, returns dh_0); gradients in two kernels, split as fla's backward (`grads.py`):
           `gdn_grads_key`, grid (K/BK, B, H, N), everything that contracts over V into K (dq final,
           dk₁; `chunk_grads.chunk_key_grads`), then `gdn_grads_wy`, grid (B, H, N), dv and the UT
           transform's part (dk = dk₁ + (dKK + dKKᵀ) K; `chunk_grads.chunk_wy_grads`).

Launch settings (block sizes, warps, pipeline stages) are a `GpuConfig` value passed down to every
stage (`kernels_pallas/config.py`; its `resolve` holds the per-shape defaults).

Measured on the H100 (bf16, C = 64, experiments/results/bench_kernels_h100_v8c.md; log and earlier
versions, including the schedules and variants no longer here, in NOTES_gpu.md), fwd+bwd against fla,
all shapes in one run: 2.25 vs 2.86 ms at B8 T2048 H16 K=V=128 (0.79×), 2.36 vs 3.01 at B2 T8192
(0.78×), 7.73 vs 8.29 at B16 T4096 (0.93×), 3.96 vs 4.01 at K = 256, V = 512 (0.99×; 0.89× in the
run before); memory 742 / 742 / 2968 / 1264 MiB against fla's 932 / 932 / 3728 / 1502. fla's own time
moves by up to 25 % between runs. Errors equal or beat fla's (o 3.3e-3, gradients ≤ 3.3e-3 against
an fp32 reference).

Backend choice: Pallas' Triton lowering (`pl.pallas_call` + `plt.CompilerParams`) compiles and runs with
jax 0.11.2 on the H100 and accepts 2-D `dot_general` with transposes, iota masks and `fori_loop`,
which is all these kernels need; the same kernels run on CPU with `interpret=True` and lower to Triton
IR on CPU for an abstract H100 (tests/pallas_gpu_test.py). Mosaic GPU (`plgpu` + wgmma) needs
M % 64 warpgroup tiles, explicit shared-memory pipelines, has no `dot_general` lowering, and its API
is marked unstable. The gains so far came from the decomposition and the memory traffic, not from
instruction choice. Triton needs head dims that are powers of two ≥ 16
(`kernels_pallas.unsupported_shape`).

Packed documents (`reset`) are handled through the masks of the chunk math (None: no documents).
T not a multiple of C is zero-padded (g = β = k = v = 0 leave the state unchanged). Grouped value
heads: q/k are read through the BlockSpec index maps (value head h reads q/k head h // G); their
gradients are summed over the group.
"""
from kernels_pallas.config import GpuConfig
from kernels_pallas.gpu.chunk import gated_delta_rule_gpu
from kernels_pallas.gpu.grads import grads
from kernels_pallas.gpu.layout import op_dtype
from kernels_pallas.gpu.output import dv_local, output
from kernels_pallas.gpu.prep import prep
from kernels_pallas.gpu.walks import walk_backward, walk_forward

__all__ = ["GpuConfig", "dv_local", "gated_delta_rule_gpu", "grads", "op_dtype", "output", "prep",
           "walk_backward", "walk_forward"]
