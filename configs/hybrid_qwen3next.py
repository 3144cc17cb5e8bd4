"""The Qwen3-Next layout: 3 Gated DeltaNet blocks : 1 gated full-attention block
(layer_pattern "GGGA"), each block followed by a SwiGLU MLP (Qwen3-Next's MoE is not modelled).

    gdn-train --config=configs/hybrid_qwen3next.py --workdir=/tmp/gdn-q3n          # tiny, CPU: 0.93M
    gdn-train --config=configs/hybrid_qwen3next.py:250m --workdir=/tmp/gdn-q3n-250m \
        --config.data.train_path=$D/train.npy --config.data.val_path=$D/val.npy     # 252M, GPU

Attention as Qwen3-Next's: output gate o ⊙ σ(W_g x) per head and channel, q/k RMSNorm, GQA (a
quarter as many key/value heads), RoPE θ = 10⁷ on the first quarter of each head's dims
(rope_fraction 0.25, Qwen3-Next's partial_rotary_factor: 16 of 64 at "tiny", 32 of 128 at "250m"),
the rest unrotated. GDN as Qwen3-Next's: twice as many value heads as q/k heads at "250m". Sizes:
"tiny" (default) and "250m"; μP base at the tiny widths (configs/hybrid_h1.py, docs/mup.md).
"""
import ml_collections

from configs.hybrid_h1 import hybrid_config

SIZES = {
    "tiny": dict(d_model=128, num_layers=4, num_heads=2, head_k_dim=64, head_v_dim=64,
                 num_v_heads=2, num_attn_heads=2, num_kv_heads=1, attn_head_dim=64),
    "250m": dict(d_model=1024, num_layers=16, num_heads=8, head_k_dim=128, head_v_dim=128,
                 num_v_heads=16, num_attn_heads=8, num_kv_heads=2, attn_head_dim=128),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  return hybrid_config(size, SIZES, layer_pattern="GGGA", rope_theta=1e7, rope_fraction=0.25,
                       attn_window=0, attn_output_gate=True, attn_qk_norm=True)
