"""Conversion parity on one GPU: fla's own forward vs gdn-jax's forward of the converted checkpoint.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.convert_parity --out=DIR
    python -m experiments.convert_parity --out=DIR --lengths=512 --variants=untied   # quicker

Needs torch, fla (`fla-core` + `flash-linear-attention`) and transformers next to gdn-jax.
For each variant (fla GatedDeltaNetConfig fields below) a random GatedDeltaNetForCausalLM is built
on the CPU in float32 (fla's init, then norm gains, conv filters and dt_bias redrawn so that no
tensor is left at a constant and a wrong layout would show), and for each dtype (float32,
bfloat16):

  1. the model is cast, moved to cuda and saved with `save_pretrained` (safetensors);
  2. `gdn_jax.convert.from_fla` reads the directory (parameters and compute in that dtype);
  3. fla's logits (model(input_ids).logits, eval mode: chunk kernels for T > 64, fused
     recurrent for T ≤ 64) and ours (jit, rule_impl "auto") on the same tokens, for each length;
  4. `gdn_jax.convert.to_fla` writes our model back and `from_pretrained` loads it: every tensor
     must equal fla's original bit for bit (`reverse_bit_exact`), and so must its logits.

Reported per row: rel_err = ‖ours − fla‖ / ‖fla‖ over all logits, max_abs_diff, the fraction of
positions whose argmax agrees, and, as the scale of the rounding, each side's relative error
against our float32 logits (`*_vs_ours_fp32`, the bfloat16 rows). Matmuls run at full float32
precision on both sides for the float32 rows (torch allow_tf32 off, jax_default_matmul_precision
"highest"); fla's Triton kernels choose their own dot precision (TF32 on Hopper), which bounds
the float32 agreement. Writes convert_parity.json (device, versions, date, settings, rows, the
command) into --out (default experiments/results), rewritten after every row.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn_jax import convert

# fla GatedDeltaNetConfig fields of the random models (fla's "340M" head shapes at 4 layers).
BASE = dict(hidden_size=512, num_hidden_layers=4, num_heads=4, head_dim=128, expand_v=2.0,
            conv_size=4, vocab_size=8192, hidden_ratio=4, norm_eps=1e-6, use_gate=True,
            use_short_conv=True, fuse_cross_entropy=False)
VARIANTS = {
    "untied": {},
    "tied_gva": dict(tie_word_embeddings=True, num_v_heads=8, expand_v=1.0,
                     allow_neg_eigval=True),
}
DTYPES = ("float32", "bfloat16")


def versions() -> dict:
  out = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "flax", "torch", "triton", "transformers", "fla"):
    try:
      out[name] = __import__(name).__version__
    except Exception as e:  # pylint: disable=broad-except
      out[name] = f"unavailable ({type(e).__name__})"
  return out


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compare(ours, fla) -> dict:
  return {"rel_err": rel_err(ours, fla),
          "max_abs_diff": float(np.max(np.abs(np.asarray(ours, np.float64) - fla))),
          "fla_logit_rms": float(np.sqrt(np.mean(np.square(np.asarray(fla, np.float64))))),
          "argmax_agree": float(np.mean(np.argmax(ours, -1) == np.argmax(fla, -1)))}


def random_fla_model(torch, fields: dict, seed: int):
  """fla's GatedDeltaNetForCausalLM (float32, CPU) with fla's init, then every norm gain
  1 + N(0, 0.2²), conv filters N(0, 1/W), dt_bias N(0, 1): no tensor constant or symmetric."""
  from fla.models import (  # pylint: disable=import-outside-toplevel
      GatedDeltaNetConfig, GatedDeltaNetForCausalLM)
  torch.manual_seed(seed)
  model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**{**BASE, **fields}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif "conv1d" in name:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
      elif name.endswith("dt_bias"):
        p.copy_(torch.randn_like(p))
  return model.eval(), GatedDeltaNetForCausalLM


def run_variant(torch, variant: str, opts, record) -> None:
  model, fla_cls = random_fla_model(torch, VARIANTS[variant], opts.seed)
  vocab = model.config.vocab_size
  gen = torch.Generator().manual_seed(opts.seed + 1)
  tokens = {T: torch.randint(0, vocab, (opts.batch, T), generator=gen) for T in opts.lengths}
  ours_fp32 = {}
  for dtype in DTYPES:
    torch_dtype = getattr(torch, dtype)
    fla_model = copy.deepcopy(model).to(device="cuda", dtype=torch_dtype)
    with tempfile.TemporaryDirectory() as tmp:
      src, back = pathlib.Path(tmp) / "fla", pathlib.Path(tmp) / "back"
      fla_model.save_pretrained(src)
      t0 = time.perf_counter()
      config, ours = convert.from_fla(src, dtype=dtype, param_dtype=dtype)
      convert_s = time.perf_counter() - t0
      convert.to_fla(ours, back)
      reloaded = fla_cls.from_pretrained(back).to(device="cuda", dtype=torch_dtype).eval()
      saved_files = sorted(p.name for p in src.iterdir())
    original = fla_model.state_dict()
    reloaded_state = reloaded.state_dict()
    reverse_exact = (sorted(reloaded_state) == sorted(original) and
                     all(torch.equal(reloaded_state[k], v) for k, v in original.items()))
    forward = nnx.jit(lambda m, t: m(t))
    for T, tok in tokens.items():
      with torch.inference_mode():
        fla_logits = fla_model(input_ids=tok.cuda()).logits.float().cpu().numpy()
        back_logits = reloaded(input_ids=tok.cuda()).logits.float().cpu().numpy()
      our_logits = np.asarray(forward(ours, jnp.asarray(tok.numpy(), jnp.int32)))
      row = {"variant": variant, "dtype": dtype, "batch": opts.batch, "seq_len": T,
             "fla_kernel": "fused_recurrent" if T <= 64 else "chunk",
             "model_config": dataclasses.asdict(config),
             "fla_files": saved_files, "convert_s": convert_s,
             "reverse_bit_exact": bool(reverse_exact),
             "reverse_logits_max_abs_diff": float(np.max(np.abs(back_logits - fla_logits))),
             **compare(our_logits, fla_logits)}
      if dtype == "float32":
        ours_fp32[T] = our_logits
      elif T in ours_fp32:
        row["fla_vs_ours_fp32"] = rel_err(fla_logits, ours_fp32[T])
        row["ours_vs_ours_fp32"] = rel_err(our_logits, ours_fp32[T])
      record(row)
    del fla_model, reloaded
    torch.cuda.empty_cache()


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  import torch  # pylint: disable=import-outside-toplevel
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  jax.config.update("jax_default_matmul_precision", "highest")

  class Opts:
    seed, batch = f.seed, f.batch
    lengths = tuple(int(x) for x in f.lengths.split(",") if x)
  out_dir = pathlib.Path(f.out or pathlib.Path(__file__).resolve().parent / "results")
  out_dir.mkdir(parents=True, exist_ok=True)
  res = {"command": "python -m experiments.convert_parity " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "device": {"torch": torch.cuda.get_device_name(0), "jax": jax.devices()[0].device_kind},
         "versions": versions(), "base_fla_config": BASE, "variants": VARIANTS,
         "settings": {"torch_allow_tf32": False, "jax_default_matmul_precision": "highest",
                      "seed": f.seed, "batch": f.batch, "lengths": list(Opts.lengths)},
         "rows": [], "errors": []}

  def save():
    (out_dir / "convert_parity.json").write_text(json.dumps(res, indent=1, default=str) + "\n")

  def record(row):
    res["rows"].append(row)
    print(f"{row['variant']:>9} {row['dtype']:>8} T={row['seq_len']:<5} rel_err "
          f"{row['rel_err']:.2e} argmax {row['argmax_agree']:.4f} reverse_exact "
          f"{row['reverse_bit_exact']}", flush=True)
    save()

  for variant in [v for v in f.variants.split(",") if v]:
    try:
      run_variant(torch, variant, Opts, record)
    except Exception as e:  # pylint: disable=broad-except  (record it, go on with the next)
      res["errors"].append({"variant": variant, "error": f"{type(e).__name__}: {e}"})
      print(f"{variant}: {type(e).__name__}: {e}", flush=True)
      save()
  save()
  print(f"wrote {out_dir / 'convert_parity.json'}", flush=True)


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("out", "", "Output folder (default: experiments/results).")
  flags.DEFINE_string("variants", ",".join(VARIANTS), f"Comma-separated, of {sorted(VARIANTS)}.")
  flags.DEFINE_string("lengths", "512,48", "Comma-separated sequence lengths (> 64: fla's "
                      "chunk kernels; ≤ 64: its fused recurrent kernel).")
  flags.DEFINE_integer("batch", 4, "Sequences per forward.")
  flags.DEFINE_integer("seed", 0, "Seed of the model and the tokens.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
