"""Tiny CPU config: the README main job (a ~0.4M-parameter byte-level GDN on Shakespeare).

    gdn-train --config=configs/tiny.py --workdir=/tmp/gdn-tiny [--config.optimizer.lr=3e-3 ...]

Every field can be overridden with --config.<path>=<value>. Sizes of 0 mean "not set" where the
model accepts None (num_v_heads, mlp_hidden) or "same as the model" (mup_base.*).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ModelConfig fields (gdn_jax.model.ModelConfig).
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, d_model=128, num_layers=2, num_heads=2, head_k_dim=64, head_v_dim=64,
      num_v_heads=0, mlp_hidden=0, conv_size=4, use_gate=True, use_short_conv=True,
      allow_neg_eigval=False, norm_eps=1e-5, tie_embeddings=False, init_std=0.02,
      output_norm_eps=0.0,       # mixer output norm eps; 0 = norm_eps. ~1e-3 for SGD (docs/mup.md)
      qk_norm_eps=1e-6,          # eps of the q/k L2 norm (fla's value)
      lm_head_init_std=0.0,      # the untied LM head's init std; 0 = init_std (docs/mup.md)
      dtype="float32", param_dtype="float32", chunk_size=64, rule_impl="chunked",
      # Compute knobs (the model's function is unchanged; README "Results", docs/training.md):
      loss_chunk_size=0,         # > 0: the LM head fused with the loss over token chunks
      fuse_projections=False,    # the GDN input projections (and MLP gate/up) as one product
      conv_impl="xla",           # "pallas": the short conv's training path in Pallas kernels
      rule_kernel_config=""))    # the rule's GPU kernel settings, "field=value,..." (GpuConfig)
  # μP: "sp" or "mup"; under μP, the base model's widths (0 = same as the model, i.e. the tuned
  # hyperparameters were found at this width).
  # "sp" | "mup" (the project's) | "paper" | "paper_sp" (Liu & Gu's recipe; docs/mup.md).
  c.parametrization = "mup"
  # Multiply every GDN mixer's output by d0/d (the paper's model/gdn-mup.py variant; "mup" and
  # "paper" only).
  c.mixer_output_multiplier = False
  # A tied embedding matrix trained as SP trains it (read-out multiplier 1, LR not scaled with
  # width): part of the project's default μP, measured better than μP's own tied rules under
  # AdamW and SGD (README "Results", docs/mup.md "The tied embedding"). No effect when
  # model.tie_embeddings is False (as here). It changes any parametrization it is used with: set
  # it False to train the paper's recipe as published (configs/paper.py does).
  c.sp_tied_embedding = True
  c.mup_base = ml_collections.ConfigDict(dict(d_model=0, num_heads=0, head_k_dim=0,
                                              head_v_dim=0, mlp_hidden=0))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",          # "adamw" | "sgd"
      lr=3e-3,               # peak learning rate (at the μP base width)
      schedule="cosine",     # after warmup: "cosine" | "linear" | "constant"
      warmup_steps=30,
      final_lr_fraction=0.1,  # lr at the last step / peak (cosine, linear)
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, momentum=0.0,
      nesterov=False,        # SGD: Nesterov momentum (the paper's SGD recipe: momentum 0.98)
      # "" = the parametrization's own; "independent" (lr·wd per step width-independent) or
      # "coupled" (decay × the group's LR multiplier, as PyTorch's AdamW param groups).
      weight_decay_convention="",
      grad_clip=1.0,         # global-norm clipping; 0 = off
      # Extra μP LR width scalings on top of the rules table, "NAME[:out]:POWER,..." (LR × m^POWER
      # for parameters whose path contains NAME; 1 at the base width), or "NAME:x:FACTOR" (LR ×
      # FACTOR at every width, the base included). "" = the table as is.
      # For ablations: the μP SGD table already has W_q, W_k's (H/H_base)^-1 (docs/mup.md).
      lr_overrides="",
      # μP SGD: W_q, W_k's LR × (H/H_base)^-1, the table's edge rule (docs/mup.md). False = the
      # table before 2026-12-06 (what a config.json without the field resumes with).
      sgd_qk_heads_rule=True,
      # The embedding's LR × this at every width, the base included: a base-width constant of
      # the model for μP and SP alike (not a width rule). Under SGD 1/16 measured best at the
      # base width and transfers (docs/mup.md, "The embedding's base constant"); AdamW: 1.
      embedding_lr_scale=1.0,
  ))

  c.data = ml_collections.ConfigDict(dict(
      train_path="",   # uint8 .npy from `python -m gdn_jax.data.prepare`; "" = embedded corpus
      val_path="",
      seq_len=128,
      batch_size=16,   # global batch (sequences per step)
  ))

  c.train = ml_collections.ConfigDict(dict(
      num_steps=500,
      log_every=25,
      eval_every=250,
      eval_batches=4,
      checkpoint_every=250,
      max_to_keep=2,
      async_checkpoint=True,
      on_nonfinite="stop",   # "stop": stop at a NaN/inf loss; "skip": skip that update, go on
      sample_tokens=300,
      sample_prompt="ROMEO:\n",
      sample_temperature=0.8,
  ))

  # Device mesh: data-parallel (+FSDP) × model (heads) axes; data=-1 uses all devices left over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return c
