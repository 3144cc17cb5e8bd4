"""Progress of a training run: fetch step metrics in batches, log them, time the steps, MFU.

The loop appends each step's device metrics with `add`; `flush` fetches them all at once (one
host sync per log interval, not per step), writes metrics.jsonl records, prints a progress line
and enforces `on_nonfinite`.
"""
from __future__ import annotations

import json
import time

import jax

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


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf and train.on_nonfinite == "stop"."""


def peak_flops(device, dtype: str) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, dt, flops in PEAK_FLOPS:
    if name in kind and (dt == dtype or name.startswith("TPU")):
      return flops
  return None


def fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
  """Pending step metrics → metrics.jsonl records, progress lines, tokens/s and MFU."""

  def __init__(self, *, metrics_file, num_steps: int, tokens_per_step: int, lr_at,
               flops_per_token: float, peak: float | None, num_devices: int, on_nonfinite: str,
               last_good_step, log=print, write: bool = True):
    self.metrics_file, self.num_steps, self.tokens_per_step = metrics_file, num_steps, \
        tokens_per_step
    self.lr_at, self.flops_per_token, self.peak = lr_at, flops_per_token, peak
    self.num_devices, self.on_nonfinite, self.last_good_step = num_devices, on_nonfinite, \
        last_good_step
    self.log, self.write_records = log, write
    self.pending: list[tuple[int, dict]] = []
    self.skipped = 0
    self._t = None              # start of the interval being timed (None: not started)
    self._steps = 0             # steps in that interval
    self.total_seconds = 0.0    # timed training time (compilation and evaluation excluded)
    self.timed_steps = 0

  def write(self, record: dict):
    if self.write_records:
      self.metrics_file.write(json.dumps(record) + "\n")
      self.metrics_file.flush()

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics))
    self._steps += 1

  def restart_clock(self):
    """Excludes what came before (evaluation, checkpointing) from the timed training time."""
    self._t = time.perf_counter()
    self._steps = 0

  @property
  def started(self) -> bool:
    return self._t is not None

  @property
  def tokens_per_s(self) -> float | None:
    return self.timed_steps * self.tokens_per_step / self.total_seconds if self.timed_steps \
        else None

  def _rate(self) -> float | None:
    """Tokens/s of the interval just fetched (None for the first: it includes compilation)."""
    now = time.perf_counter()
    rate = None
    if self._t is not None and self._steps:
      dt = now - self._t
      rate = self._steps * self.tokens_per_step / dt
      self.total_seconds += dt
      self.timed_steps += self._steps
    self._t, self._steps = now, 0
    return rate

  def flush(self) -> dict | None:
    """Fetches pending metrics, logs them, enforces on_nonfinite. Returns the last record."""
    if not self.pending:
      return None
    fetched = jax.device_get([m for _, m in self.pending])
    rate = self._rate()
    last, pending = None, self.pending
    self.pending = []
    for (s, _), m in zip(pending, fetched):
      loss, gnorm, finite = float(m["loss"]), float(m["grad_norm"]), bool(m["finite"])
      if not finite:
        self.skipped += 1
        self.write({"step": s, "loss": loss, "grad_norm": gnorm, "skipped": True})
        if self.on_nonfinite == "stop":
          raise NonFiniteLossError(
              f"non-finite loss at step {s} (loss={loss}, grad_norm={gnorm}); stopped. The last "
              f"good checkpoint is step {self.last_good_step()}; lower optimizer.lr or set "
              "train.on_nonfinite=skip.")
        self.log(f"step {s}: non-finite loss ({loss}); update skipped")
        continue
      record = {"step": s, "loss": loss, "grad_norm": gnorm, "lr": float(self.lr_at(s - 1))}
      if s == pending[-1][0] and rate is not None:
        record["tokens_per_s"] = rate
        if self.peak:
          record["mfu"] = rate * self.flops_per_token / (self.peak * self.num_devices)
      self.write(record)
      last = record
    if last is not None:
      self._print(last)
    return last

  def _print(self, last: dict):
    rate_s = f"{last['tokens_per_s'] / 1e3:.1f}k tok/s" if "tokens_per_s" in last else "compiling"
    mfu_s = f"{100 * last['mfu']:.1f}%" if "mfu" in last else "n/a"
    eta = (fmt_time((self.num_steps - last["step"]) * self.total_seconds / self.timed_steps)
           if self.timed_steps else "?")
    self.log(f"step {last['step']:>6}/{self.num_steps} | loss {last['loss']:.4f} | lr "
             f"{last['lr']:.2e} | {rate_s} | MFU {mfu_s} | ETA {eta}")
