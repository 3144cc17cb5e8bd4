"""GDN-H1 (Yang, Kautz & Hatamizadeh 2024): Gated DeltaNet blocks interleaved with sliding-window
attention (layer_pattern "GS": GDN, SWA, GDN, SWA, ...), each block followed by a SwiGLU MLP.

    gdn-train --config=configs/hybrid_h1.py --workdir=/tmp/gdn-h1            # tiny, CPU: 0.47M
    gdn-train --config=configs/hybrid_h1.py:200m --workdir=/tmp/gdn-h1-200m \
        --config.data.train_path=$D/train.npy --config.data.val_path=$D/val.npy   # 199M, GPU

Sizes ("tiny" default, "200m"): the SWA blocks use the GDN blocks' head count and head dim, a
quarter as many key/value heads (GQA), no output gate, q/k RMSNorm. The window is 64 tokens
(tiny, sequences of 128) or 2048 (200m, sequences of 4096 in the paper's setting; here 2048, so
raise data.seq_len to see the window act). μP ("mup", the project's) with its base at the tiny
widths, so the tiny config's tuned LR is the one to transfer (docs/mup.md, "Hybrid GDN +
attention"); the paper's recipe ("paper") defines no attention and refuses hybrid models.
Every field can be overridden with --config.<path>=<value> (configs/tiny.py).
"""
import ml_collections

from configs import tiny

SIZES = {
    "tiny": dict(d_model=128, num_layers=2, num_heads=2, head_k_dim=64, head_v_dim=64,
                 num_attn_heads=2, num_kv_heads=1, attn_head_dim=64, attn_window=64),
    "200m": dict(d_model=1024, num_layers=16, num_heads=8, head_k_dim=128, head_v_dim=128,
                 num_attn_heads=8, num_kv_heads=2, attn_head_dim=128, attn_window=2048),
}


def hybrid_config(size: str, sizes: dict, **fields) -> ml_collections.ConfigDict:
  """configs/tiny.py with the model at `size` (a key of `sizes`) and the hybrid fields."""
  if size not in sizes:
    raise ValueError(f"config size {size!r}; expected one of {sorted(sizes)} "
                     "(--config=configs/<file>.py:<size>).")
  c = tiny.get_config()
  c.model.update(sizes[size])
  for name, value in fields.items():
    c.model[name] = value
  # μP base: the tiny widths, attention included (0 = the model's own).
  base = sizes["tiny"]
  c.mup_base = ml_collections.ConfigDict({k: base[k] for k in (
      "d_model", "num_heads", "head_k_dim", "head_v_dim", "num_v_heads", "num_attn_heads",
      "num_kv_heads", "attn_head_dim") if k in base})
  c.mup_base.mlp_hidden = 0
  if size != "tiny":   # GPU-sized: bf16 compute, long sequences (as configs/gpu.py)
    c.model.update(dtype="bfloat16", rule_impl="auto")
    c.optimizer.update(warmup_steps=200)
    c.data.update(seq_len=2048, batch_size=8)
    c.train.update(num_steps=2000, log_every=20, eval_every=500, eval_batches=8,
                   checkpoint_every=500)
  return c


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  return hybrid_config(size, SIZES, layer_pattern="GS", rope_theta=10000.0,
                       attn_output_gate=False, attn_qk_norm=True)
