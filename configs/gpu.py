"""GPU throughput config: a ~100M-parameter GDN (fla-like shape), bf16 compute, seq 2048.

    gdn-train --config=configs/gpu.py --workdir=/tmp/gdn-gpu \
        --config.data.train_path=/data/big/train.npy --config.data.val_path=/data/big/val.npy

`data.batch_size` is the global batch: keep 8 sequences per GPU (8 on one H100, 16 on 2×H200) to
compare throughput per device. The larger corpus recipe is in docs/training.md; without
train_path/val_path the embedded Shakespeare corpus is used.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, d_model=768, num_layers=12, num_heads=6, head_k_dim=128, head_v_dim=128,
      num_v_heads=0, mlp_hidden=0, conv_size=4, use_gate=True, use_short_conv=True,
      allow_neg_eigval=False, norm_eps=1e-5, tie_embeddings=False, init_std=0.02,
      output_norm_eps=0.0,       # mixer output norm eps; 0 = norm_eps. ~1e-3 for SGD (docs/mup.md)
      qk_norm_eps=1e-6,          # eps of the q/k L2 norm (fla's value)
      dtype="bfloat16",          # compute dtype; parameters and optimizer state stay float32
      param_dtype="float32", chunk_size=64,
      rule_impl="auto",          # Pallas kernels on one GPU, XLA chunked on several (ops.default_impl)
      lm_head_init_std=0.0, loss_chunk_size=0, fuse_projections=False, conv_impl="xla",
      rule_kernel_config=""))    # see configs/tiny.py
  c.parametrization = "mup"            # see configs/tiny.py
  c.mixer_output_multiplier = False
  c.sp_tied_embedding = True           # see configs/tiny.py (no effect: untied here)
  # μP base = the tiny config's width: its tuned lr transfers (docs/mup.md).
  c.mup_base = ml_collections.ConfigDict(dict(d_model=128, num_heads=2, head_k_dim=64,
                                              head_v_dim=64, mlp_hidden=0))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, schedule="cosine", warmup_steps=200, final_lr_fraction=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, momentum=0.0, nesterov=False,
      weight_decay_convention="", grad_clip=1.0, lr_overrides="",
      sgd_qk_heads_rule=True, embedding_lr_scale=1.0))  # see configs/tiny.py
  c.data = ml_collections.ConfigDict(dict(train_path="", val_path="", seq_len=2048,
                                          batch_size=8))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=2000, log_every=20, eval_every=500, eval_batches=8, checkpoint_every=500,
      max_to_keep=2, async_checkpoint=True, on_nonfinite="stop", sample_tokens=400,
      sample_prompt="ROMEO:\n", sample_temperature=0.8))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return c
