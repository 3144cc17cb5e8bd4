"""The parametrizations as data: one table of per-class rules per (parametrization, optimizer).

A rule gives, for one class of parameters, four width scalings relative to the base model:

    init   the init std: × m_in^a · m_out^b · m_d^c of the draw's own std (`Scaling`), or an
           absolute std = factor · d^p (`Std`; d = d_model of the model being built)
    mult   a forward multiplier on the output of the parameter's module
    lr     a learning-rate multiplier r_p
    decay  whether weight decay touches the parameter (None: its `weight_decay` label decides)

with m_in = fan_in / base fan_in, m_out = fan_out / base fan_out (from each parameter's
`fan_in_axes` / `fan_out_axes` labels) and m_d = d_model / base d_model. The weight-decay
multiplier w_p follows from the parametrization's decay convention:

    "independent"  w_p = 1 / r_p: the decay per step, lr·wd·θ, does not change with width
                   (microsoft/mup's MuAdamW convention; the project's tables)
    "coupled"      w_p = 1: decay lr·r_p·wd·θ shrinks with the LR multiplier, as PyTorch's AdamW
                   does with per-group LRs (the paper's reference code)

How a parameter gets its class is the parametrization's `classify`:

  * "sp", "mup" (the project's, derived in docs/mup.md from Tensor Programs V): by which fan
    grows — (finite, ∞) input-like, (∞, ∞) hidden, (∞, finite) output-like, (finite, finite)
    scalar. Works for any width scheme (heads grow or head dims grow).
  * "paper", "paper_sp" (Liu & Gu, arXiv 2606.04048, as its reference code applies it; facts in
    docs/mup.md): by the parameter's `role` label, since the recipe singles out the gate
    projections W_a, W_b and the gate scalars A_log, dt_bias, which fans alone cannot tell from
    other matrices and vectors. Every multiplier is a power of m_d = d / d0 alone.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

OPTIMIZERS = ("adamw", "sgd")
DECAY_CONVENTIONS = ("independent", "coupled")


@dataclasses.dataclass(frozen=True)
class Scaling:
  """The width scaling factor · m_in^fan_in · m_out^fan_out · m_d^width (exponents; `factor` is a
  base-width constant, 1 in every table)."""
  fan_in: float = 0.0
  fan_out: float = 0.0
  width: float = 0.0
  factor: float = 1.0

  def __call__(self, m_in: float, m_out: float, m_d: float) -> float:
    return self.factor * m_in ** self.fan_in * m_out ** self.fan_out * m_d ** self.width


ONE = Scaling()


@dataclasses.dataclass(frozen=True)
class Std:
  """An absolute init std, factor · d_model^d_power (replaces the module's default std)."""
  factor: float
  d_power: float = 0.0

  def __call__(self, d_model: int) -> float:
    return self.factor * d_model ** self.d_power


@dataclasses.dataclass(frozen=True)
class Rule:
  """Per-class scalings, each relative to the base model's value (the base LR, WD, init std)."""
  init: Scaling | Std = ONE   # init std: relative to the draw's std, or absolute
  mult: Scaling = ONE         # forward multiplier (on the module's output)
  lr: Scaling = ONE           # learning-rate multiplier r_p
  decay: bool | None = None   # weight decay on this class; None: the `weight_decay` label


@dataclasses.dataclass(frozen=True)
class Parametrization:
  """A complete parametrization: classes, per-optimizer rule tables and the GDN-specific rules.

  GDN rules (K = head_k_dim, relative to the base model's K_base):
    qk_scale = K_base^-½ · (K/K_base)^qk_scale_power       the readout scale o = scale·Sᵀq
    output-norm eps = output_norm_eps · (K/K_base)^o_norm_eps_power
    q/k L2-norm eps = qk_norm_eps · (K/K_base)^qk_norm_eps_power
  `tied_readout`: the multiplier of a tied read-out logits = h Eᵀ (the untied LM head is a
  parameter with its own class). `mixer_output`: the scaling that the option
  `mixer_output_multiplier=True` puts on every GDN mixer's output (after W_o); None means the
  parametrization has no such rule and the option is refused.

  Attention rule (hybrid models, gdn_jax.attention; H = attn_head_dim, relative to H_base):
    attention logit scale = H_base^-½ · (H/H_base)^attn_scale_power
  −½ is the usual H^-½, −1 μP's "1/d" attention (H_base^½/H); both are H_base^-½ at the base head
  dim. None: the parametrization defines no attention, and models with attention are refused.

  SGD rule for W_q, W_k (role "qk_proj"; H = num_heads of the GDN layers, relative to H_base):
    SGD LR multiplier × (H/H_base)^sgd_qk_heads_power          (AdamW: no such factor)
  SGD's stability edge on a layer's q–k block is its most curved head, the largest of H draws
  (docs/mup.md, "What rule for W_q, W_k under SGD follows from this"), so it falls with the
  number of heads, not with d or K: a power of H, not of the fans.
  """
  name: str
  classes: tuple[str, ...]
  classify: Callable[[str, bool, bool], str]   # (role, fan-in grows, fan-out grows) -> class
  rules: Mapping[str, Mapping[str, Rule]]      # optimizer -> class -> Rule
  qk_scale_power: float
  o_norm_eps_power: float
  qk_norm_eps_power: float
  tied_readout: Scaling
  mixer_output: Scaling | None
  decay_convention: str
  description: str
  attn_scale_power: float | None = None
  sgd_qk_heads_power: float = 0.0

  def __post_init__(self):
    for optimizer, table in self.rules.items():
      if set(table) != set(self.classes):
        raise ValueError(f"{self.name}/{optimizer}: rules for {sorted(table)}; expected one "
                         f"for every class {sorted(self.classes)}.")
    if self.decay_convention not in DECAY_CONVENTIONS:
      raise ValueError(f"{self.name}: decay convention {self.decay_convention!r}; expected one "
                       f"of {DECAY_CONVENTIONS}.")


# ---- The project's tables (Tensor Programs V, Table 3 in microsoft/mup's multiplier form). ----

def classify_by_fans(role: str, fan_in_grows: bool, fan_out_grows: bool) -> str:
  """(fan-in, fan-out) → class: (finite, ∞) input, (∞, ∞) hidden, (∞, fin.) output, else scalar."""
  del role
  if fan_in_grows:
    return "hidden" if fan_out_grows else "output"
  return "input" if fan_out_grows else "scalar"


FAN_CLASSES = ("input", "hidden", "output", "scalar")

# SP: fan-in init (var ∝ 1/fan_in) on matrices that read a growing dim, one global LR.
_SP = {
    "input": Rule(),
    "hidden": Rule(init=Scaling(fan_in=-0.5)),
    "output": Rule(init=Scaling(fan_in=-0.5)),
    "scalar": Rule(),
}
SP = Parametrization(
    name="sp", classes=FAN_CLASSES, classify=classify_by_fans,
    rules={"adamw": _SP, "sgd": _SP},
    # fla's K^-½ readout scale and fixed eps values.
    qk_scale_power=-0.5, o_norm_eps_power=0.0, qk_norm_eps_power=0.0,
    tied_readout=ONE, mixer_output=None, decay_convention="independent",
    description="standard parametrization: fan-in init, one global LR (TP5's SP)",
    attn_scale_power=-0.5)   # softmax attention's usual 1/√H

MUP = Parametrization(
    name="mup", classes=FAN_CLASSES, classify=classify_by_fans,
    rules={
        # μP + Adam: hidden LR 1/fan_in; the read-out gets a 1/fan_in forward multiplier
        # instead of a 1/fan_in² init variance; input-like and scalar parameters keep the LR.
        "adamw": {
            "input": Rule(),
            "hidden": Rule(init=Scaling(fan_in=-0.5), lr=Scaling(fan_in=-1)),
            "output": Rule(mult=Scaling(fan_in=-1)),
            "scalar": Rule(),
        },
        # μP + SGD: gradients of vector-like parameters are Θ(1/width), so their LR grows
        # with fan-out; the read-out's gradient is shrunk by its 1/fan_in multiplier, so its
        # LR grows too.
        "sgd": {
            "input": Rule(lr=Scaling(fan_out=1)),
            "hidden": Rule(init=Scaling(fan_in=-0.5)),
            "output": Rule(mult=Scaling(fan_in=-1), lr=Scaling(fan_in=1)),
            "scalar": Rule(),
        },
    },
    # With unit q, k the μP "1/d attention" rule is built in: keep the base readout scale.
    # mean(o²) = Θ(1/K) at init, so the output norm's eps follows it (eps regime width-free);
    # pre-norm |q|² = Θ(K), so the q/k norm's eps follows that (docs/mup.md).
    qk_scale_power=0.0, o_norm_eps_power=-1.0, qk_norm_eps_power=1.0,
    tied_readout=Scaling(width=-1), mixer_output=Scaling(width=-1),
    decay_convention="independent",
    description="the project's μP, derived from TP5 (docs/mup.md)",
    # SGD's edge on a layer's q–k block is its most curved head: the W_q, W_k LR falls with the
    # number of heads (docs/mup.md, "What rule for W_q, W_k under SGD follows from this").
    sgd_qk_heads_power=-1.0,
    # Softmax attention (hybrid models): q, k, v, o, gate are classed by fans like every matrix;
    # the logits scale as 1/H (TP5's 1/d attention: q and k become correlated in training, so
    # qᵀk = Θ(H)), written H_base^½/H so that μP == SP at the base head dim.
    attn_scale_power=-1.0)


# ---- The paper's recipe (Liu & Gu 2026, reference code lauyikfung/gated_delta_net_mup). ----

PAPER_ROLE_CLASS = {
    "embedding": "embedding",     # tied with the LM head in the paper's models
    "matrix": "hidden",           # every nn.Linear: q, k, v, g, o, MLP
    "qk_proj": "hidden",          # W_q, W_k (nn.Linear; the project's SGD table singles them out)
    "conv": "hidden",             # the short convs are nn.Conv1d: the Linear init and groups
    "readout": "readout",         # an untied LM head (the reference ties it)
    "norm": "norm",               # RMSNorm gains, incl. the gated output norm
    "gate_proj": "gate",          # W_α, W_β (a_proj, b_proj)
    "gate_scalar": "gate_scalar",  # A_log, dt_bias
}
PAPER_CLASSES = ("embedding", "hidden", "readout", "norm", "gate", "gate_scalar")


def classify_by_role(role: str, fan_in_grows: bool, fan_out_grows: bool) -> str:
  del fan_in_grows, fan_out_grows
  if role == "attention":
    raise ValueError("the paper's recipe (Liu & Gu) defines no rules for softmax attention "
                     "(parameters of role 'attention', a hybrid model's 'A'/'S' layers); "
                     "expected parametrization 'mup' or 'sp' for a model with attention, or "
                     "layer_pattern='' (all GDN) for 'paper' / 'paper_sp'.")
  if role not in PAPER_ROLE_CLASS:
    raise ValueError(f"the paper's recipe has no class for a parameter of role {role!r}; "
                     f"expected one of {sorted(PAPER_ROLE_CLASS)}.")
  return PAPER_ROLE_CLASS[role]


# The reference's init factor f of std = f/√d for every Linear and conv: 0.5 in its AdamW
# configs, 0.32 in its SGD configs (0.32/√256 = 0.02, the SP value at its base width 256).
PAPER_INIT_FACTOR = {"adamw": 0.5, "sgd": 0.32}
EMBEDDING_STD = Std(0.02)
W_ONLY = Scaling(width=1)


def _paper_table(optimizer: str) -> dict[str, Rule]:
  linear = Std(PAPER_INIT_FACTOR[optimizer], -0.5)
  if optimizer == "adamw":
    hidden_lr = Scaling(width=-1)         # every matrix, conv and norm gain: LR × d0/d
    return {
        "embedding": Rule(init=EMBEDDING_STD, lr=ONE, decay=False),
        "hidden": Rule(init=linear, lr=hidden_lr, decay=True),
        "readout": Rule(init=linear, mult=Scaling(width=-1), lr=hidden_lr, decay=True),
        "norm": Rule(lr=hidden_lr, decay=False),
        "gate": Rule(init=linear, lr=hidden_lr, decay=True),       # W_α, W_β: hidden weights
        "gate_scalar": Rule(lr=ONE, decay=False),
    }
  return {
      "embedding": Rule(init=EMBEDDING_STD, lr=Scaling(width=1), decay=False),
      "hidden": Rule(init=linear, lr=ONE, decay=True),
      "readout": Rule(init=linear, mult=Scaling(width=-1), lr=ONE, decay=True),
      "norm": Rule(lr=ONE, decay=False),
      # "The key deviation from standard μP": W_α, W_β LR Θ(1/√d), A_log, dt_bias LR Θ(√d).
      "gate": Rule(init=linear, lr=Scaling(width=-0.5), decay=False),
      "gate_scalar": Rule(lr=Scaling(width=0.5), decay=False),
  }


PAPER = Parametrization(
    name="paper", classes=PAPER_CLASSES, classify=classify_by_role,
    rules={optimizer: _paper_table(optimizer) for optimizer in OPTIMIZERS},
    # fla's defaults: K^-½ readout scale, fixed eps values (1e-6 in the paper's models).
    qk_scale_power=-0.5, o_norm_eps_power=0.0, qk_norm_eps_power=0.0,
    tied_readout=Scaling(width=-1),
    mixer_output=Scaling(width=-1),     # the reference's model/gdn-mup.py variant
    decay_convention="coupled",
    description="Liu & Gu's μP as their reference code applies it (docs/mup.md)")


def _paper_sp_table(optimizer: str) -> dict[str, Rule]:
  std = Std(0.02)   # GPT-2 style: every Linear, conv and the embedding N(0, 0.02²)
  return {
      "embedding": Rule(init=std, decay=False),
      "hidden": Rule(init=std, decay=True),
      "readout": Rule(init=std, decay=True),
      "norm": Rule(decay=False),
      "gate": Rule(init=std, decay=optimizer == "adamw"),   # the SGD gate group has no decay
      "gate_scalar": Rule(decay=False),
  }


PAPER_SP = Parametrization(
    name="paper_sp", classes=PAPER_CLASSES, classify=classify_by_role,
    rules={optimizer: _paper_sp_table(optimizer) for optimizer in OPTIMIZERS},
    qk_scale_power=-0.5, o_norm_eps_power=0.0, qk_norm_eps_power=0.0,
    tied_readout=ONE, mixer_output=None, decay_convention="coupled",
    description="the paper's SP baseline: N(0, 0.02²) everywhere, one global LR")

# ---- Read-out ablations of μP (issue 20, item 4; docs/mup.md "μP SGD against TP5's SP"). ----
# Each is μP at the base width. Not recommended: they test what SP's read-out does under SGD.
# mup_head_sp: SP's untied head in function space (fan-in init × m^-½, no 1/m multiplier, LR × 1/m;
# under SGD the same effective update as μP's head). mup_head_init: μP's head (1/m multiplier,
# μP's LR) with its draw × m^½: the same effective init as mup_head_sp; under SGD they differ only
# in the raw gradient a global-norm clip sees (× m for mup_head_sp).
MUP_HEAD_SP = dataclasses.replace(
    MUP, name="mup_head_sp", description="μP with SP's LM head (read-out ablation, issue 20)",
    rules={opt: dict(rules, output=Rule(init=Scaling(fan_in=-0.5), lr=Scaling(fan_in=-1)))
           for opt, rules in MUP.rules.items()})
MUP_HEAD_INIT = dataclasses.replace(
    MUP, name="mup_head_init",
    description="μP with its LM head's draw × m^½ (read-out ablation, issue 20)",
    rules={opt: dict(rules, output=dataclasses.replace(rules["output"], init=Scaling(fan_in=0.5)))
           for opt, rules in MUP.rules.items()})

PARAMETRIZATIONS: dict[str, Parametrization] = {
    p.name: p for p in (SP, MUP, PAPER, PAPER_SP, MUP_HEAD_SP, MUP_HEAD_INIT)}


def get(name: str) -> Parametrization:
  if name not in PARAMETRIZATIONS:
    raise ValueError(f"`parametrization`={name!r}; expected one of {tuple(PARAMETRIZATIONS)}.")
  return PARAMETRIZATIONS[name]


def check_optimizer(optimizer: str):
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"`optimizer`={optimizer!r}; expected one of {OPTIMIZERS} (the μP table "
                     "to use: 'adamw' for updates of normalised size, 'sgd' for raw gradients).")
