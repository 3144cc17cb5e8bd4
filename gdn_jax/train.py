"""Training: config → model, optimizer, data, mesh → jit train loop with checkpoints, eval, logs.

    gdn-train --config=configs/tiny.py --workdir=/tmp/gdn-tiny [--config.optimizer.lr=3e-3 ...]
    python -m gdn_jax.train  (same flags)

One step (all under one `jax.jit`, batch sharded over the mesh's data axis):

    loss = mean_t −log softmax(model(x_{<T}))[x_{t+1}]
    g = ∇loss;  g ← g · min(1, clip / ‖g‖₂)                   (global-norm clipping)
    θ ← θ − lr(step) · r_p · (adam(g) + wd · w_p · θ)          (μP/SP multipliers r_p, w_p; gdn_jax.mup)
    if loss or ‖g‖ is not finite: keep θ and the optimizer state (the update is dropped in-graph,
    so no checkpoint ever holds a poisoned state); "stop" then ends the run naming the step,
    "skip" goes on.

    lr(step) = peak · step / warmup                                 step < warmup
             = peak · (f + (1 − f) · ½(1 + cos(π s)))               cosine,   s = progress after warmup
             = peak · (1 − (1 − f) s)                               linear
             = peak                                                 constant

The run lives in --workdir: config.json (a rerun must match it), checkpoints/ (orbax; a rerun resumes
from the latest), metrics.jsonl (one JSON object per logged step or evaluation), sample.txt.
"""
from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from gdn_jax import checkpoint as ckpt
from gdn_jax import sharding
from gdn_jax.data import pipeline, prepare, tokenizer
from gdn_jax.generate import generate
from gdn_jax.loss import cross_entropy
from gdn_jax.model import GatedDeltaNetLM, ModelConfig, flops_per_token, num_params
from gdn_jax.mup import build_model, make_optimizer, multipliers, parse_lr_overrides

# Peak dense FLOP/s per device for MFU: (device_kind substring, compute dtype) → FLOP/s. float32
# matmuls run as TF32 on these GPUs by default. CPUs have no entry: MFU is reported as "n/a".
PEAK_FLOPS = (
    ("H100 PCIe", "bfloat16", 756e12), ("H100 PCIe", "float32", 378e12),
    ("H100", "bfloat16", 989e12), ("H100", "float32", 494.5e12),
    ("H200", "bfloat16", 989e12), ("H200", "float32", 494.5e12),
    ("A100", "bfloat16", 312e12), ("A100", "float32", 156e12),
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12), ("TPU v6 lite", "bfloat16", 918e12),
)
SCHEDULES = ("cosine", "linear", "constant")
ON_NONFINITE = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf and train.on_nonfinite == "stop"."""


# ---- Config → objects. ----

def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """ModelConfig from config.model (0 → None for num_v_heads, mlp_hidden, output_norm_eps)."""
  fields = dict(config.model)
  for name in ("num_v_heads", "mlp_hidden", "output_norm_eps"):
    fields[name] = fields.get(name) or None
  known = {f.name for f in ModelConfig.__dataclass_fields__.values()}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.model: unknown fields {unknown}; expected fields of ModelConfig "
                     f"{sorted(known)}.")
  return ModelConfig(**fields)


def base_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The μP base: the model with the widths in config.mup_base that are not 0."""
  mc = model_config(config)
  overrides = {k: v for k, v in dict(config.mup_base).items() if v}
  return ModelConfig(**{**{f: getattr(mc, f) for f in mc.__dataclass_fields__}, **overrides})


def _require(cond: bool, name: str, value, expected: str):
  if not cond:
    raise ValueError(f"config: `{name}`={value!r}; expected {expected}.")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate_config(config: ml_collections.ConfigDict):
  """Raises ValueError naming the first bad field (checked before anything is written)."""
  o, d, t = config.optimizer, config.data, config.train
  _require(config.parametrization in ("sp", "mup"), "parametrization", config.parametrization,
           '"sp" or "mup"')
  _require(o.name in ("adamw", "sgd"), "optimizer.name", o.name, '"adamw" or "sgd"')
  _require(o.lr > 0 and math.isfinite(o.lr), "optimizer.lr", o.lr, "a positive finite float")
  _require(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"one of {SCHEDULES}")
  _require(_is_int(o.warmup_steps) and 0 <= o.warmup_steps < t.num_steps,
           "optimizer.warmup_steps", o.warmup_steps, f"an int in [0, num_steps={t.num_steps})")
  _require(0 <= o.final_lr_fraction <= 1, "optimizer.final_lr_fraction", o.final_lr_fraction,
           "a float in [0, 1]")
  for name in ("weight_decay", "grad_clip", "momentum"):
    _require(o[name] >= 0, f"optimizer.{name}", o[name], "a float ≥ 0 (0 = off)")
  for name in ("seq_len", "batch_size"):
    _require(_is_int(d[name]) and d[name] >= 1, f"data.{name}", d[name], "an int ≥ 1")
  _require(bool(d.train_path) == bool(d.val_path), "data.val_path", d.val_path,
           "set together with data.train_path (both empty = the embedded corpus)")
  for name in ("num_steps", "log_every", "checkpoint_every", "max_to_keep", "eval_batches"):
    _require(_is_int(t[name]) and t[name] >= 1, f"train.{name}", t[name], "an int ≥ 1")
  _require(_is_int(t.eval_every) and t.eval_every >= 0, "train.eval_every", t.eval_every,
           "an int ≥ 0 (0 = only at the end)")
  _require(_is_int(t.sample_tokens) and t.sample_tokens >= 0, "train.sample_tokens",
           t.sample_tokens, "an int ≥ 0 (0 = no sample)")
  _require(t.on_nonfinite in ON_NONFINITE, "train.on_nonfinite", t.on_nonfinite,
           f"one of {ON_NONFINITE}")
  model_config(config)  # ModelConfig validates the model fields
  base_model_config(config)
  overrides = lr_overrides(config)
  if overrides:  # every name must match a parameter (checked on shapes only)
    shapes = nnx.eval_shape(lambda: GatedDeltaNetLM(model_config(config), rngs=nnx.Rngs(0)))
    try:
      multipliers(shapes, parametrization=config.parametrization, optimizer=o.name,
                  base_config=base_model_config(config), lr_overrides=overrides)
    except ValueError as e:
      raise ValueError(f"optimizer.lr_overrides={o.lr_overrides!r}: {e}") from None


def lr_overrides(config: ml_collections.ConfigDict) -> dict:
  """`optimizer.lr_overrides` ("embed:out:-1,q_proj:-1"; "" = none) as gdn_jax.mup Scalings."""
  spec = config.optimizer.get("lr_overrides", "") or ""
  try:
    return parse_lr_overrides([s.strip() for s in spec.split(",") if s.strip()])
  except ValueError as e:
    raise ValueError(f"optimizer.lr_overrides={spec!r}: {e}") from None


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, then cosine / linear decay to final_lr_fraction · peak, or flat."""
  o, steps = config.optimizer, config.train.num_steps
  peak, warmup, final = o.lr, o.warmup_steps, o.lr * o.final_lr_fraction
  decay_steps = steps - warmup
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.final_lr_fraction)
  elif o.schedule == "linear":
    after = optax.linear_schedule(peak, final, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  # Warmup reaches the peak at step `warmup`; the first update (count 0) uses peak / warmup.
  up = lambda count: peak * (count + 1) / warmup
  return optax.join_schedules([up, after], [warmup])


def make_tx(model, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping in front of the μP/SP optimizer of gdn_jax.mup."""
  o = config.optimizer
  base = base_model_config(config) if config.parametrization == "mup" else None
  tx = make_optimizer(model, parametrization=config.parametrization, optimizer=o.name,
                      learning_rate=lr_schedule(config), weight_decay=o.weight_decay,
                      base_config=base, b1=o.b1, b2=o.b2, eps=o.eps, momentum=o.momentum,
                      lr_overrides=lr_overrides(config))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip else tx


# ---- Steps. ----

def make_steps(graphdef, tx, mesh, param_sh, opt_sh):
  """jit-compiled (train_step, eval_step) over the mesh."""

  def loss_fn(params, batch_BxT1):
    model = nnx.merge(graphdef, params)
    return cross_entropy(model(batch_BxT1[:, :-1]), batch_BxT1[:, 1:])

  def train_step(params, opt_state, batch_BxT1):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch_BxT1)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics

  rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  # CPU buffers cannot be donated; on accelerators donation halves the state's memory.
  donate = () if mesh.devices.flat[0].platform == "cpu" else (0, 1)
  train_step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, batch_sh),
                       out_shardings=(param_sh, opt_sh, rep), donate_argnums=donate)
  eval_step = jax.jit(loss_fn, in_shardings=(param_sh, batch_sh), out_shardings=rep)
  return train_step, eval_step


def peak_flops(device, dtype: str) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, dt, flops in PEAK_FLOPS:
    if name in kind and (dt == dtype or name.startswith("TPU")):
      return flops
  return None


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class _Terminate:
  """SIGTERM → a flag the loop checks after every step (it then saves and exits cleanly)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ---- The loop. ----

def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          log=print) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary dict.

  Raises ValueError for bad configs / data / a workdir holding another config (before anything
  is written) and NonFiniteLossError when the loss diverges with on_nonfinite="stop".
  """
  validate_config(config)
  t, d = config.train, config.data
  mc = model_config(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices)
  n_data = mesh.shape[sharding.DATA]
  pc, pi = jax.process_count(), jax.process_index()
  _require(d.batch_size % (n_data * pc) == 0 and d.batch_size % pc == 0, "data.batch_size",
           d.batch_size, f"a multiple of the data-parallel size {n_data} × {pc} processes")
  if d.train_path:
    paths = {"train": d.train_path, "val": d.val_path}
  else:
    paths = prepare.embedded_corpus()
  local_batch = d.batch_size // pc
  data_kw = dict(seq_len=d.seq_len, batch_size=local_batch, process_index=pi, process_count=pc)
  data_iter = pipeline.train_iterator(paths["train"], seed=config.seed, **data_kw)
  val = pipeline.val_batches(paths["val"], num_batches=t.eval_batches, **data_kw)

  # Data and config are fine: only now touch the workdir.
  workdir = pathlib.Path(workdir)
  rerun = ckpt.check_or_write_config(workdir, config.to_json())

  base = base_model_config(config) if config.parametrization == "mup" else None
  model = build_model(mc, parametrization=config.parametrization, base_config=base,
                      rngs=nnx.Rngs(config.seed))
  tx = make_tx(model, config)
  graphdef, params = nnx.split(model)
  param_sh = sharding.tree_shardings(params, mesh)
  params = jax.device_put(params, param_sh)
  opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  train_step, eval_step = make_steps(graphdef, tx, mesh, param_sh, opt_sh)
  rng = jax.random.key_data(jax.random.key(config.seed))

  checkpointer = ckpt.Checkpointer(workdir / "checkpoints", max_to_keep=t.max_to_keep,
                                   async_save=t.async_checkpoint)
  step = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    state = {"params": params, "opt_state": opt_state, "step": np.asarray(0, np.int64), "rng": rng}
    restored = checkpointer.restore(latest, ckpt.abstract_like(state), data_iter)
    params, opt_state, rng = restored["params"], restored["opt_state"], restored["rng"]
    step = int(restored["step"])
    log(f"resumed from step {step} ({checkpointer.directory})")
  elif rerun:
    log(f"workdir {workdir} has this config but no checkpoint: starting from step 0")

  def save(at_step):
    checkpointer.save(at_step, {"params": params, "opt_state": opt_state,
                                "step": np.asarray(at_step, np.int64), "rng": rng}, data_iter)

  tokens_per_step = d.batch_size * d.seq_len
  flops_tok = flops_per_token(mc, d.seq_len)
  peak = peak_flops(mesh.devices.flat[0], mc.dtype)
  log(f"model: {num_params(mc):,} params, {config.parametrization}, {flops_tok / 1e6:.2f} MFLOP "
      f"per token (fwd+bwd incl. the rule) | mesh {dict(mesh.shape)} on "
      f"{mesh.devices.flat[0].device_kind} | {tokens_per_step:,} tokens/step")
  val_arrays = [sharding.global_batch(b, mesh) for b in val]
  metrics_file = open(workdir / "metrics.jsonl", "a")

  def write(record):
    if pi == 0:
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()

  def evaluate():
    losses = [eval_step(params, b) for b in val_arrays]
    return float(np.mean(jax.device_get(losses)))

  schedule = lr_schedule(config)
  pending: list[tuple[int, dict]] = []
  summary = {"start_step": step, "skipped": 0, "preempted": False, "workdir": str(workdir),
             "param_specs": {".".join(sharding._path_names(kp)): list(sh.spec) for kp, sh in
                             jax.tree_util.tree_flatten_with_path(param_sh)[0]}}
  timer = {"t": None, "steps": 0, "total": 0.0, "timed_steps": 0}

  def flush():
    """Fetches pending step metrics, logs them, enforces on_nonfinite. Returns the last loss."""
    if not pending:
      return None
    fetched = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    rate = None
    if timer["t"] is not None and timer["steps"]:
      dt = now - timer["t"]
      rate = timer["steps"] * tokens_per_step / dt
      timer["total"] += dt
      timer["timed_steps"] += timer["steps"]
    timer["t"], timer["steps"] = now, 0
    last = None
    for (s, _), m in zip(pending, fetched):
      loss, gnorm, finite = float(m["loss"]), float(m["grad_norm"]), bool(m["finite"])
      if not finite:
        summary["skipped"] += 1
        write({"step": s, "loss": loss, "grad_norm": gnorm, "skipped": True})
        if t.on_nonfinite == "stop":
          pending.clear()
          last_good = checkpointer.latest_step()
          raise NonFiniteLossError(
              f"non-finite loss at step {s} (loss={loss}, grad_norm={gnorm}); stopped. The last "
              f"good checkpoint is step {last_good} in {checkpointer.directory}; lower "
              "optimizer.lr or set train.on_nonfinite=skip.")
        log(f"step {s}: non-finite loss ({loss}); update skipped")
        continue
      record = {"step": s, "loss": loss, "grad_norm": gnorm, "lr": float(schedule(s - 1))}
      if s == pending[-1][0] and rate is not None:
        record["tokens_per_s"] = rate
        if peak:
          record["mfu"] = rate * flops_tok / (peak * mesh.size)
      write(record)
      last = record
    pending.clear()
    if last is not None:
      rate_s = f"{last['tokens_per_s'] / 1e3:.1f}k tok/s" if "tokens_per_s" in last else "compiling"
      mfu_s = f"{100 * last['mfu']:.1f}%" if "mfu" in last else "n/a"
      eta = (_fmt_time((t.num_steps - last["step"]) * timer["total"] / timer["timed_steps"])
             if timer["timed_steps"] else "?")
      log(f"step {last['step']:>6}/{t.num_steps} | loss {last['loss']:.4f} | lr "
          f"{last['lr']:.2e} | {rate_s} | MFU {mfu_s} | ETA {eta}")
    return last

  with _Terminate() as term:
    try:
      while step < t.num_steps:
        batch = sharding.global_batch(next(data_iter), mesh)
        params, opt_state, metrics = train_step(params, opt_state, batch)
        step += 1
        pending.append((step, metrics))
        timer["steps"] += 1
        if timer["t"] is None:  # the first step includes compilation: time from its end
          flush()
        done = step == t.num_steps
        if step % t.log_every == 0 or done or term.requested:
          flush()
        if (t.eval_every and step % t.eval_every == 0) or done:
          flush()
          val_loss = summary["val_loss"] = evaluate()
          write({"step": step, "val_loss": val_loss})
          log(f"step {step:>6}/{t.num_steps} | val loss {val_loss:.4f}")
          timer["t"] = time.perf_counter()  # evaluation time is not training time
        if step % t.checkpoint_every == 0 or done or term.requested:
          flush()  # never checkpoint past a non-finite step
          save(step)
        if term.requested and not done:
          log(f"SIGTERM: saved step {step}; exiting (rerun the same command to resume)")
          summary["preempted"] = True
          break
    finally:
      checkpointer.close()
      metrics_file.close()

  summary["step"] = step
  if timer["timed_steps"]:
    summary["tokens_per_s"] = timer["timed_steps"] * tokens_per_step / timer["total"]
  if step == t.num_steps and not summary["preempted"]:
    if "val_loss" not in summary:  # a rerun of a finished run
      summary["val_loss"] = evaluate()
    if t.sample_tokens:
      model = nnx.merge(graphdef, params)
      prompt = tokenizer.encode(t.sample_prompt)[None]
      out = generate(model, jnp.asarray(prompt, jnp.int32), t.sample_tokens,
                     temperature=t.sample_temperature, rng=jax.random.wrap_key_data(rng))
      text = tokenizer.decode(np.asarray(out[0]))
      summary["sample"] = text
      if pi == 0:
        (workdir / "sample.txt").write_text(text)
      log("---- sample ----\n" + text + "\n----------------")
  return summary


# ---- CLI. ----

def main(argv):
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    raise ValueError(f"gdn-train: unexpected arguments {argv[1:]}; expected only flags.")
  f = flags.FLAGS
  if f.distributed:  # multi-host: coordinator address, process count and id from the environment
    jax.distributed.initialize()
  try:
    summary = train(f.config, f.workdir)
  except (ValueError, NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  keys = ("step", "val_loss", "tokens_per_s", "skipped", "preempted")
  print(json.dumps({k: summary[k] for k in keys if k in summary}), flush=True)


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, sample.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host; "
                    "see docs/training.md).")
  flags.mark_flags_as_required(["config", "workdir"])


def cli():
  from absl import app
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
