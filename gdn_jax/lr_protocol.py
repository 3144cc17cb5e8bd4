"""The LR-transfer protocol: what a sweep trains, which (seed, LR) grids it runs, and its analysis.

    Protocol                   a sweep: model family, widths, rows, optimizers, seeds, data, grids
    Ablation                   a variant applied to every row (eps values, LR overrides)
    Plan(protocol, rows).jobs() the jobs still to run, given the runs done so far, by priority
    analyze(rows, base_width)  per row: gdn_jax.lr_stats.transfer_summary of its fine runs
    markdown_table(summary)    the README table

Grids. A pilot at the base width (the first seed, a 1-log2 grid, extended while its best point
sits at an edge) centres the base width's ½-log2 grid (`fine_points_base` points, every seed);
that grid's seed-mean optimum centres the other widths' grids (`fine_points`). Rows whose
optimum is expected to move (SP) are centred `sp_slope` log2 per doubling of the width away and
get two more points. A grid whose seed-mean best point sits at an edge is extended by three
points on that side, twice at most. Only the fine runs enter the analysis; the pilot only
chooses where to look. Everything is derived again from the rows on disk, so a sweep resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from gdn_jax import lr_stats

SP_ROWS = ("sp", "paper_sp")
# At the base width the project's μP and SP are one model (every width rule is 1 there;
# tests/mup_test.py, `test_mup_equals_sp_at_base_width`), so an SP row without base-width runs of
# its own uses μP's of the same variant, and plans them under μP's name.
SAME_AT_BASE = {"sp": "mup"}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What a sweep trains and how its grids are chosen (see the module docstring)."""
  family: str                       # "paper" | "heads" | "dims" (gdn_jax.families)
  widths: tuple[int, ...]
  base_width: int
  layers: int
  steps: int
  batch: int
  seq_len: int
  rows: tuple[tuple[str, str], ...]          # (parametrization, variant "" | "mixer_out")
  optimizers: tuple[str, ...]
  seeds: tuple[int, ...]                     # μP rows
  sp_seeds: tuple[int, ...]                  # SP rows (fewer)
  data: str                                  # data slice name ("embedded": the package corpus)
  warmup: int
  final_fraction: float = 0.1
  dtype: str = "bfloat16"
  rule_impl: str = "chunked"                 # the rule inside the vmapped program ("auto": the
                                             # Pallas kernels on GPU; gdn_jax.ops.IMPLS)
  head_dim: int = 32                         # "heads": fixed head dim
  num_heads: int = 4                         # "dims": fixed head count
  grid: dict | None = None                   # optimizer → (lo, hi, step): fixed grids, no pilot
  pilot: dict | None = None                  # optimizer → (lo, hi, step) at the base width
  fine_points_base: int = 7                  # the base width's ½-log2 grid (around the pilot)
  fine_points: int = 5                       # other widths (around the base's optimum)
  fine_step: float = 0.5
  sp_slope: dict = dataclasses.field(default_factory=lambda: {"adamw": -1.0, "sgd": -0.5})
  optimizer_settings: dict = dataclasses.field(default_factory=lambda: {
      "adamw": dict(weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0),
      "sgd": dict(momentum=0.98, nesterov=True, weight_decay=0.0, grad_clip=1.0)})
  val_batches: int = 8
  max_replicas: dict = dataclasses.field(default_factory=dict)   # width → replicas per program
  # width → runs per job: a longer job is split into parts of whole LR points (every seed of
  # each), each written when it finishes, so that a width whose grid outlasts one device call
  # (10 min) still resumes (`split_job`).
  max_job_runs: dict = dataclasses.field(default_factory=dict)
  model_overrides: dict = dataclasses.field(default_factory=dict)  # more ModelConfig fields
                                                                   # (e.g. a hybrid layer_pattern)

  @property
  def scheme(self) -> str:
    """The results' `scheme`: the family, and the layer pattern of a hybrid (e.g. heads+GGGA)."""
    pattern = self.model_overrides.get("layer_pattern", "")
    return self.family + (f"+{pattern}" if pattern else "")


@dataclasses.dataclass(frozen=True)
class Ablation:
  """A variant applied to every row of a sweep: its name parts, model fields, LR overrides and
  optimizer fields (e.g. ("embedding_lr_scale", 0.0625))."""
  parts: tuple[str, ...] = ()
  model_extra: tuple[tuple[str, float], ...] = ()
  lr_overrides: tuple[str, ...] = ()
  optimizer_extra: tuple[tuple[str, float], ...] = ()

  def variant(self, row_variant: str) -> str:
    return ",".join(([row_variant] if row_variant else []) + list(self.parts))


def row_name(parametrization: str, variant: str) -> str:
  return parametrization + (f"+{variant}" if variant else "")


def _grid(lo, hi, step):
  return [float(x) for x in np.arange(lo, hi + step / 2, step)]


def split_job(job: dict, max_runs: int | None) -> list[dict]:
  """`job` as parts of at most `max_runs` runs (seeds × LRs), each a run of whole LR points (all
  of the job's seeds at each, at least one point per part), in the job's LR order; [job] when it
  fits or `max_runs` is None."""
  seeds, xs = job["seeds"], job["log2_lrs"]
  if not max_runs or len(seeds) * len(xs) <= max_runs:
    return [job]
  per = max(1, max_runs // len(seeds))
  return [dict(job, log2_lrs=xs[i:i + per]) for i in range(0, len(xs), per)]


class Plan:
  """The protocol's jobs in priority order, derived again from the results after every job."""

  def __init__(self, p: Protocol, rows: list[dict], ablation: Ablation = Ablation()):
    self.p, self.ablation, self.done = p, ablation, {}
    self.planned = {(param, ablation.variant(v)) for param, v in p.rows}   # (param, variant)
    for r in rows:
      self.done[self._key(r["parametrization"], r.get("variant", ""), r["optimizer"],
                          r["width"], r.get("phase", "fine"), r["seed"], r["log2_lr"])] = r

  @staticmethod
  def _key(*parts):
    return tuple(parts)

  def _losses(self, param, variant, opt, width, phase, seeds, xs):
    """seed → [loss per x] (NaN diverged, None if a run is missing)."""
    out = {}
    for s in seeds:
      vals = []
      for x in xs:
        r = self.done.get(self._key(param, variant, opt, width, phase, s, x))
        if r is None:
          return None
        vals.append(np.nan if r["val_loss"] is None else r["val_loss"])
      out[s] = vals
    return out

  def _xs(self, param, variant, opt, width, phase, seed):
    return sorted({k[6] for k in self.done if k[:5] == (param, variant, opt, width, phase)
                   and k[5] == seed})

  def _extend(self, xs, curve, step, max_rounds, first_len):
    """xs extended by 3 points on the side where the curve's best point sits at the edge."""
    ok = np.isfinite(curve)
    if not ok.any() or len(xs) >= first_len + 3 * max_rounds:
      return xs
    i = int(np.nanargmin(np.where(ok, curve, np.inf)))
    if i == 0:
      return [xs[0] - step * k for k in (3, 2, 1)] + list(xs)
    if i == len(xs) - 1:
      return list(xs) + [xs[-1] + step * k for k in (1, 2, 3)]
    return xs

  def jobs(self) -> list[dict]:
    """Jobs that can run now (not done), highest priority first."""
    p, ready = self.p, []
    widths = sorted(p.widths, key=lambda w: (w != p.base_width, -w))    # base, then widest
    for o, opt in enumerate(p.optimizers):
      for r, (param, variant) in enumerate(p.rows):
        variant = self.ablation.variant(variant)
        seeds = p.sp_seeds if param in SP_ROWS else p.seeds
        for k, width in enumerate(widths):
          for job in self._row_jobs(param, variant, opt, width, seeds):
            for part in split_job(job, p.max_job_runs.get(width)):
              part["priority"] = (job["phase"] != "pilot", k, r, o)
              ready.append(part)
    return sorted(ready, key=lambda j: j["priority"])

  def _base_source(self, param, variant, opt):
    """(parametrization, variant) whose base-width runs this row uses: its own if it has any;
    else its variant without the parts that are the identity at the base width (`at_base_width`),
    if those runs exist or the row has no twin; else, for an SP row, μP's (`SAME_AT_BASE`), by the
    same rule."""
    has = lambda prm, v: any(k[:4] == (prm, v, opt, self.p.base_width) for k in self.done)
    if has(param, variant):
      return param, variant
    plain, twin = at_base_width(variant), SAME_AT_BASE.get(param)
    if twin is None or has(param, plain):
      return param, plain
    return self._base_source(twin, variant, opt)

  def _row_jobs(self, param, variant, opt, width, seeds):
    p = self.p
    if width == p.base_width:
      source, variant = self._base_source(param, variant, opt)
      if source != param:        # μP's runs: planned by a μP row of this sweep that uses them,
        if any(prm == source and self._base_source(prm, v, opt) == (source, variant)
               for prm, v in self.planned):
          return []
        param, seeds = source, p.seeds                         # else here, with μP's seeds
    base = dict(parametrization=param, variant=variant, optimizer=opt, width=width,
                model_extra=dict(self.ablation.model_extra),
                lr_overrides=list(self.ablation.lr_overrides),
                optimizer_extra=dict(self.ablation.optimizer_extra))
    if p.grid is not None:
      xs = _grid(*p.grid[opt])
      todo = self._missing(param, variant, opt, width, "fine", seeds, xs)
      return [dict(base, phase="fine", seeds=list(seeds), log2_lrs=todo)] if todo else []
    if width == p.base_width:
      center = self._pilot_center(param, variant, opt, seeds[0], base)
      if isinstance(center, dict):            # the pilot itself still has to run
        return [center]
      n = p.fine_points_base
    else:                                     # centred at the base width's fine optimum
      center = self._fine_optimum(*self._base_source(param, variant, opt), opt, p.base_width,
                                  seeds)
      n = p.fine_points
      if center is not None and param in SP_ROWS:
        center += p.sp_slope[opt] * math.log2(width / p.base_width)
        n += 2
    if center is None:
      return []
    center = round(center / p.fine_step) * p.fine_step
    first = [center + p.fine_step * (k - (n - 1) / 2) for k in range(n)]
    have = self._xs(param, variant, opt, width, "fine", seeds[0]) or first
    xs = sorted(set(have) | set(first))
    todo = self._missing(param, variant, opt, width, "fine", seeds, xs)
    if todo:
      return [dict(base, phase="fine", seeds=list(seeds), log2_lrs=todo)]
    curve = lr_stats.seed_mean(list(self._losses(param, variant, opt, width, "fine", seeds,
                                                 xs).values()))
    more = self._extend(xs, curve, p.fine_step, 2, n)
    todo = self._missing(param, variant, opt, width, "fine", seeds, more)
    return [dict(base, phase="fine", seeds=list(seeds), log2_lrs=todo)] if todo else []

  def _fine_optimum(self, param, variant, opt, width, seeds):
    """The seed-mean optimum of a finished fine grid (None while it is not finished)."""
    xs = self._xs(param, variant, opt, width, "fine", seeds[0])
    if not xs or self._missing(param, variant, opt, width, "fine", seeds, xs):
      return None
    if [j for j in self._row_jobs(param, variant, opt, width, seeds)]:
      return None                             # an extension is still due
    curve = lr_stats.seed_mean(list(self._losses(param, variant, opt, width, "fine", seeds,
                                                 xs).values()))
    return lr_stats.optimum(xs, curve)[0]

  def _missing(self, param, variant, opt, width, phase, seeds, xs):
    return [x for x in xs if any(self._key(param, variant, opt, width, phase, s, x)
                                 not in self.done for s in seeds)]

  def _pilot_center(self, param, variant, opt, seed, base):
    """The pilot's optimum (float), the pilot job still to run (dict), or None (diverged)."""
    p = self.p
    xs = self._xs(param, variant, opt, p.base_width, "pilot", seed) or _grid(*p.pilot[opt])
    todo = self._missing(param, variant, opt, p.base_width, "pilot", [seed], xs)
    if todo:
      return dict(base, width=p.base_width, phase="pilot", seeds=[seed], log2_lrs=todo)
    curve = np.asarray(self._losses(param, variant, opt, p.base_width, "pilot", [seed],
                                    xs)[seed], float)
    more = self._extend(xs, curve, p.pilot[opt][2], 3, len(_grid(*p.pilot[opt])))
    if len(more) > len(xs):
      return dict(base, width=p.base_width, phase="pilot", seeds=[seed],
                  log2_lrs=[x for x in more if x not in xs])
    return lr_stats.optimum(xs, curve)[0]


# Row variants that are the identity at the base width (every width rule is 1 there).
BASE_IDENTITY_VARIANTS = ("mixer_out", "sp_tied", "head_sp", "head_init", "const_init")


def at_base_width(variant: str) -> str:
  """The variant without its parts that are the identity at the base width: NAME[:out]:POWER LR
  overrides and `BASE_IDENTITY_VARIANTS` (a row without base-width runs of its own uses these).
  A constant LR factor (NAME:x:FACTOR) is kept: it changes the base-width model too."""
  def identity(v):
    parts = v.split(":")
    return (len(parts) > 1 and not (len(parts) == 3 and parts[1] == "x")
            or v in BASE_IDENTITY_VARIANTS)
  return ",".join(v for v in variant.split(",") if v and not identity(v))


# The SP each μP row is judged against (issue 20, item 4: μP at its transferred LR must reach a
# loss no worse than SP at SP's own tuned LR).
SP_BASELINE = {"mup": "sp", "paper": "paper_sp"}


def _baseline_key(key, present):
  """(scheme, SP, optimizer, variant) for a μP row: the same variant, else the variant without
  its first part (a row variant such as "mixer_out" comes first, ablation parts after it)."""
  scheme, param, opt, variant = key
  if param not in SP_BASELINE:
    return None
  for v in (variant, ",".join(variant.split(",")[1:])):
    if (scheme, SP_BASELINE[param], opt, v) in present:
      return scheme, SP_BASELINE[param], opt, v
  return None


def _name(key) -> str:
  return f"{key[0]}/{row_name(key[1], '')}/{key[2]}" + (f"[{key[3]}]" if key[3] else "")


def _parse_name(name: str) -> tuple[str, str, str, str]:
  """(scheme, parametrization, optimizer, variant) of a summary name (`_name`'s inverse)."""
  head, _, variant = name.partition("[")
  scheme, param, opt = head.split("/")
  return scheme, param, opt, variant[:-1]


def seed_grids(rows: list[dict]) -> tuple[dict, dict]:
  """`lr_stats.transfer_summary`'s inputs from runs (dicts with width, seed, log2_lr, val_loss;
  None = diverged): width → the log2 LRs every seed of that width ran, and width → {seed: its
  losses on them} (NaN = diverged)."""
  grids, losses = {}, {}
  for w in sorted({r["width"] for r in rows}):
    by_seed = {}
    for r in rows:
      if r["width"] == w:
        by_seed.setdefault(r["seed"], {})[r["log2_lr"]] = (np.nan if r["val_loss"] is None
                                                           else r["val_loss"])
    xs = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    grids[w] = xs
    losses[w] = {s: [v[x] for x in xs] for s, v in by_seed.items()}
  return grids, losses


def analyze(rows: list[dict], base_width: int | None = None) -> dict:
  """Per (scheme, parametrization, optimizer, variant): `lr_stats.transfer_summary` of the fine
  runs, plus runs, divergences and program speed; for μP rows also `loss_vs_sp`: per width, the
  best loss minus its SP row's best loss (`lr_stats.best_loss_gap`), and `loss_vs_const_init_sp`
  against the `sp+const_init` row (fla's constant init) where the rows hold it.
  A row without base-width runs of its own uses those `Plan` gives it (`base_width_runs_from`:
  the variant whose runs they are, or the row name of μP's for an SP row)."""
  rows = [r for r in rows if r.get("phase", "fine") == "fine"]
  group = lambda r: (r["scheme"], r["parametrization"], r["optimizer"], r.get("variant", ""))
  summary, all_losses = {}, {}
  for key in sorted({group(r) for r in rows}):
    sel = [r for r in rows if group(r) == key]
    shared = None
    if base_width is not None and not any(r["width"] == base_width for r in sel):
      # As Plan._base_source: the variant's identity-free part, then (SP) μP's same variant.
      scheme, param, opt, variant = key
      plain, twin = at_base_width(variant), SAME_AT_BASE.get(param)
      for src_param, src_variant in ((param, plain), (twin, variant), (twin, plain)):
        if src_param is None or (src_param, src_variant) == (param, variant):
          continue
        base_runs = [r for r in rows if r["width"] == base_width
                     and group(r) == (scheme, src_param, opt, src_variant)]
        if base_runs:
          shared = src_variant if src_param == param else row_name(src_param, src_variant)
          sel += base_runs
          break
    grids, losses = seed_grids(sel)
    s = lr_stats.transfer_summary(grids, losses)
    all_losses[key] = losses
    name = _name(key)
    mfus = [r["program"]["mfu"] for r in sel if r.get("program", {}).get("mfu")]
    s.update(base_width_runs_from=shared, runs=len(sel),
             diverged_runs=sum(r["val_loss"] is None for r in sel),
             tokens_per_run=sel[0].get("tokens"), data=sel[0].get("data"),
             program_mfu_median=float(np.median(mfus)) if mfus else None,
             gpu_seconds=float(sum({json.dumps(r["program"], sort_keys=True): r["program"]
                                    ["seconds"] for r in sel if "program" in r}.values())))
    summary[name] = s
  for key, losses in all_losses.items():
    const = (key[0], "sp", key[2], "const_init")   # fla's constant-init SP, where it was run
    for field, base in (("loss_vs_sp", _baseline_key(key, all_losses)),
                        ("loss_vs_const_init_sp", const if key[1] == "mup" else None)):
      if base is not None and base in all_losses:
        summary[_name(key)][field] = dict(against=_name(base), by_width={
            w: lr_stats.best_loss_gap(losses[w], all_losses[base][w])
            for w in sorted(losses) if w in all_losses[base]})
  return summary


def markdown_loss_table(summary: dict) -> str:
  """μP rows against their SP: best loss [interval] per width and the gap [interval]."""
  lines = ["| row | optimizer | width | best loss [95 % interval] | its SP's best loss | "
           "gap μP − SP [interval] | SP row |", "|---|---|---|---|---|---|---|"]
  iv = lambda x: "" if not x else f" [{x[0]:.4f}, {x[1]:.4f}]"
  signed = lambda x: "" if not x else f" [{x[0]:+.4f}, {x[1]:+.4f}]"
  for name, s in summary.items():
    _, row, opt, variant = _parse_name(name)
    for field in ("loss_vs_sp", "loss_vs_const_init_sp"):
      if field not in s:
        continue
      against = s[field]["against"]
      sp = summary[against]
      _, sp_param, _, sp_variant = _parse_name(against)
      sp_row = row_name(sp_param, sp_variant)
      for w, gap in s[field]["by_width"].items():
        lines.append(f"| {row_name(row, variant)} | {opt} | {w} | {s['best_loss'][w]:.4f}"
                     f"{iv(s['best_loss_interval'][w])} | {sp['best_loss'][w]:.4f}"
                     f"{iv(sp['best_loss_interval'][w])} | {gap['gap']:+.4f}"
                     f"{signed(gap['interval'])} | {sp_row} |")
  return "\n".join(lines) + "\n"


def markdown_table(summary: dict) -> str:
  """The README table: optimum ± interval per width, drift ± interval, regret, best loss."""
  fmt = lambda o: ("–" if o["log2_lr"] is None else f"{o['log2_lr']:.2f}" + (
      f" [{o['interval'][0]:.2f}, {o['interval'][1]:.2f}]" if o["interval"] else "")
      + ("ᵉ" if o["how"] == "edge of grid" else ""))
  lines = ["| row | optimizer | optimal log2 LR [95 % interval] per width | drift [interval] | "
           "max regret at the base LR | best loss per width |", "|---|---|---|---|---|---|"]
  schemes = {name.split("/")[0] for name in summary}
  for name, s in summary.items():
    scheme, row, opt, variant = _parse_name(name)
    if len(schemes) > 1:
      row = f"{scheme}: {row}"
    optima = "; ".join(f"{w}: {fmt(s['optimum'][w])}" for w in s["widths"])
    drift = ("–" if s["drift_log2"] is None else f"{s['drift_log2']:.2f}" + (
        f" [{s['drift_interval'][0]:.2f}, {s['drift_interval'][1]:.2f}]"
        if s["drift_interval"] else ""))
    regret = max(s["transfer_regret"].values()) if s["transfer_regret"] else None
    best = " / ".join(f"{s['best_loss'][w]:.4f}" if w in s["best_loss"] else "–"
                      for w in s["widths"])
    lines.append(f"| {row_name(row, variant)} | {opt} | {optima} | {drift} | "
                 f"{'–' if regret is None else f'{regret:.4f}'} | {best} |")
  return "\n".join(lines) + "\n"


