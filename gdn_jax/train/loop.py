"""The training loop: data, mesh, model and step in; checkpoints, metrics and a sample out.

    train(config, workdir, *, devices=None, log=print) -> summary dict

The run lives in `workdir`: config.json (a rerun must match it), checkpoints/ (orbax; a rerun
resumes from the latest), metrics.jsonl (one JSON object per logged step or evaluation),
sample.txt. SIGTERM finishes the current step, saves and returns (rerun to resume).
"""
from __future__ import annotations

import pathlib
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gdn_jax import checkpoint as ckpt
from gdn_jax import sharding
from gdn_jax.data import pipeline, prepare, tokenizer
from gdn_jax.generate import generate
from gdn_jax.model import flops_per_token, num_params
from gdn_jax.train import config as config_lib
from gdn_jax.train.progress import Progress, peak_flops
from gdn_jax.train.step import make_loss_fn, make_train_step


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


def jit_steps(graphdef, tx, mesh, param_sh, opt_sh):
  """The shared train step and the loss, jit-compiled over the mesh (batch over `data`), traced
  with the mesh active so that the rule's Pallas kernels run once per device (`under_mesh`)."""
  rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  # CPU buffers cannot be donated; on accelerators donation halves the state's memory.
  donate = () if mesh.devices.flat[0].platform == "cpu" else (0, 1)
  train_step = jax.jit(sharding.under_mesh(make_train_step(graphdef, tx), mesh),
                       in_shardings=(param_sh, opt_sh, batch_sh, None),
                       out_shardings=(param_sh, opt_sh, rep), donate_argnums=donate)
  eval_step = jax.jit(sharding.under_mesh(make_loss_fn(graphdef), mesh),
                      in_shardings=(param_sh, batch_sh),
                      out_shardings=rep)
  return train_step, eval_step


def _data(config, mesh):
  d, t = config.data, config.train
  n_data = mesh.shape[sharding.DATA]
  pc, pi = jax.process_count(), jax.process_index()
  config_lib._require(d.batch_size % (n_data * pc) == 0 and d.batch_size % pc == 0,
                      "data.batch_size", d.batch_size,
                      f"a multiple of the data-parallel size {n_data} × {pc} processes")
  paths = ({"train": d.train_path, "val": d.val_path} if d.train_path
           else prepare.embedded_corpus())
  kw = dict(seq_len=d.seq_len, batch_size=d.batch_size // pc, process_index=pi,
            process_count=pc)
  return (pipeline.train_iterator(paths["train"], seed=config.seed, **kw),
          pipeline.val_batches(paths["val"], num_batches=t.eval_batches, **kw))


def train(config: ml_collections.ConfigDict, workdir: str, *, devices=None,
          log=print) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns a summary dict.

  Raises ValueError for bad configs / data / a workdir holding another config (before anything
  is written) and NonFiniteLossError when the loss diverges with on_nonfinite="stop".
  """
  config_lib.validate_config(config)
  t, d = config.train, config.data
  mc = config_lib.model_config(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices)
  data_iter, val = _data(config, mesh)

  # Data and config are fine: only now touch the workdir.
  workdir = pathlib.Path(workdir)
  rerun = ckpt.check_or_write_config(workdir, config.to_json())

  model = config_lib.build_model(config)
  tx = config_lib.make_tx(model, config)
  graphdef, params = nnx.split(model)
  param_sh = sharding.tree_shardings(params, mesh)
  params = jax.device_put(params, param_sh)
  opt_sh = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  train_step, eval_step = jit_steps(graphdef, tx, mesh, param_sh, opt_sh)
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
  peak_lr = float(config.optimizer.lr)
  summary = {"start_step": step, "skipped": 0, "preempted": False, "workdir": str(workdir),
             "param_specs": {".".join(sharding._path_names(kp)): list(sh.spec) for kp, sh in
                             jax.tree_util.tree_flatten_with_path(param_sh)[0]}}

  def evaluate():
    return float(np.mean(jax.device_get([eval_step(params, b) for b in val_arrays])))

  with open(workdir / "metrics.jsonl", "a") as metrics_file, _Terminate() as term:
    progress = Progress(metrics_file=metrics_file, num_steps=t.num_steps,
                        tokens_per_step=tokens_per_step, lr_at=config_lib.lr_schedule(config),
                        flops_per_token=flops_tok, peak=peak, num_devices=mesh.size,
                        on_nonfinite=t.on_nonfinite, log=log,
                        last_good_step=lambda: f"{checkpointer.latest_step()} in "
                                               f"{checkpointer.directory}",
                        write=jax.process_index() == 0)
    try:
      while step < t.num_steps:
        batch = sharding.global_batch(next(data_iter), mesh)
        params, opt_state, metrics = train_step(params, opt_state, batch, peak_lr)
        step += 1
        progress.add(step, metrics)
        if not progress.started:  # the first step includes compilation: time from its end
          progress.flush()
        done = step == t.num_steps
        if step % t.log_every == 0 or done or term.requested:
          progress.flush()
        if (t.eval_every and step % t.eval_every == 0) or done:
          progress.flush()
          val_loss = summary["val_loss"] = evaluate()
          progress.write({"step": step, "val_loss": val_loss})
          log(f"step {step:>6}/{t.num_steps} | val loss {val_loss:.4f}")
          progress.restart_clock()  # evaluation time is not training time
        if step % t.checkpoint_every == 0 or done or term.requested:
          progress.flush()  # never checkpoint past a non-finite step
          save(step)
        if term.requested and not done:
          log(f"SIGTERM: saved step {step}; exiting (rerun the same command to resume)")
          summary["preempted"] = True
          break
    finally:
      summary["skipped"] = progress.skipped
      checkpointer.close()

  summary["step"] = step
  if progress.tokens_per_s is not None:
    summary["tokens_per_s"] = progress.tokens_per_s
  if step == t.num_steps and not summary["preempted"]:
    if "val_loss" not in summary:  # a rerun of a finished run
      summary["val_loss"] = evaluate()
    if t.sample_tokens:
      summary["sample"] = _sample(config, graphdef, params, rng, workdir, log)
  return summary


def _sample(config, graphdef, params, rng, workdir, log) -> str:
  t = config.train
  model = nnx.merge(graphdef, params)
  prompt = tokenizer.encode(t.sample_prompt)[None]
  out = generate(model, jnp.asarray(prompt, jnp.int32), t.sample_tokens,
                 temperature=t.sample_temperature, rng=jax.random.wrap_key_data(rng))
  text = tokenizer.decode(np.asarray(out[0]))
  if jax.process_index() == 0:
    (workdir / "sample.txt").write_text(text)
  log("---- sample ----\n" + text + "\n----------------")
  return text
