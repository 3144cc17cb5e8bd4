"""The paper's setting (Liu & Gu 2026): its model family and recipe, at a GPU-friendly size.

    gdn-train --config=configs/paper.py --workdir=/tmp/gdn-paper \
        --config.data.train_path=$D/train.npy --config.data.val_path=$D/val.npy
    # SGD as the paper trains it:
    ... --config.optimizer.name=sgd --config.optimizer.lr=0.02 --config.optimizer.momentum=0.98 \
        --config.optimizer.nesterov=True --config.optimizer.weight_decay=0

Model: gdn_jax.families.paper_config — 6 q/k heads of head_k_dim = 0.75·d/6, value dim 1.5·d,
SwiGLU ratio 4 (fla's rounding), every eps 1e-6, tied embeddings; 8 layers at d = 512 with the
μP base at d0 = 256, as in the reference's configs. Byte vocabulary here (the paper: GPT-2's 50304
tokens, FineWeb-Edu, context 1024, 480 sequences per step, 20k steps). Optimizer: the reference's
AdamW (β 0.9/0.95, weight decay 0.1 in PyTorch's convention, clipping 1, warmup then cosine).
The parametrization "paper" picks its init factor by optimizer (0.5 AdamW, 0.32 SGD).
"""
import ml_collections

from configs import tiny
from gdn_jax.families import paper_config

WIDTH, BASE_WIDTH = 512, 256


def _model_fields(d: int, **overrides) -> dict:
  c = paper_config(d, vocab_size=256, **overrides)
  return {f: getattr(c, f) for f in c.__dataclass_fields__}


def get_config() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  fields = _model_fields(WIDTH, dtype="bfloat16", chunk_size=64, rule_impl="auto")
  fields["num_v_heads"] = 0      # None in ModelConfig
  c.model = ml_collections.ConfigDict(fields)
  base = paper_config(BASE_WIDTH)
  c.parametrization = "paper"
  c.sp_tied_embedding = False    # the paper's recipe as published: its own tied read-out rules
  c.mup_base = ml_collections.ConfigDict(dict(
      d_model=base.d_model, num_heads=base.num_heads, head_k_dim=base.head_k_dim,
      head_v_dim=base.head_v_dim, mlp_hidden=base.mlp_hidden))
  c.optimizer.update(name="adamw", lr=1e-3, warmup_steps=200, final_lr_fraction=0.05,
                     weight_decay=0.1, grad_clip=1.0)
  c.data.update(seq_len=1024, batch_size=16)
  c.train.update(num_steps=2000, log_every=20, eval_every=500, eval_batches=8,
                 checkpoint_every=500)
  return c
