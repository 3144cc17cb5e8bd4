"""Sharding: partition rules, and the same losses on 1 device and on 8 CPU devices (4 data × 2 model)."""
import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from gdn_jax import sharding
from tests.train_test import REPO


def _mesh(data, model):
  return AbstractMesh((data, model), (sharding.DATA, sharding.MODEL))


@pytest.mark.parametrize("path, shape, data, model, expected", [
    (("blocks", 0, "mixer", "q_proj", "kernel"), (64, 32), 4, 2, P("data", "model")),
    (("blocks", 0, "mixer", "o_proj", "kernel"), (32, 64), 4, 2, P("model", "data")),
    (("blocks", 0, "mlp", "down_proj", "kernel"), (96, 32), 8, 1, P("data", None)),
    (("blocks", 0, "mixer", "A_log"), (2,), 1, 2, P("model")),
    (("embed", "embedding"), (256, 32), 8, 2, P("data", None)),
    (("blocks", 0, "mixer", "q_proj", "kernel"), (30, 6), 4, 4, P(None, None)),  # no divisor
    ((0, "mu", "blocks", 0, "mixer", "k_conv", "weight"), (4, 32), 2, 2, P("data", "model")),
    (("count",), (), 8, 1, P()),
])
def test_partition_spec(path, shape, data, model, expected):
  keypath = tuple(jax.tree_util.SequenceKey(k) if isinstance(k, int) else
                  jax.tree_util.DictKey(k) for k in path)
  spec = sharding.partition_spec(keypath, shape, _mesh(data, model))
  assert spec == expected


def test_make_mesh_rejects_bad_shapes():
  n = len(jax.devices())
  with pytest.raises(ValueError, match="`model`=0"):
    sharding.make_mesh(-1, 0)
  with pytest.raises(ValueError, match="`data`="):
    sharding.make_mesh(n + 1, 1)


_SCRIPT = r"""
import json, sys, tempfile
import jax
from tests.train_test import make_token_files, tiny_config, read_metrics
from gdn_jax import train
assert len(jax.devices()) == 8, jax.devices()
paths = make_token_files(tempfile.mkdtemp(), num_bytes=40_000)
out = {}
for name, (data, model, devices) in {"1": (1, 1, jax.devices()[:1]),
                                     "4x2": (4, 2, None)}.items():
  c = tiny_config(paths, num_steps=3, checkpoint_every=3)
  c.data.batch_size = 8
  c.mesh.update(data=data, model=model)
  summary = train.train(c, tempfile.mkdtemp() + "/run", devices=devices, log=lambda s: None)
  metrics = read_metrics(summary["workdir"])
  # Rerunning restores the sharded checkpoint of the last step (nothing left to train).
  again = train.train(c, summary["workdir"], devices=devices, log=lambda s: None)
  out[name] = {"loss": [metrics[s]["loss"] for s in sorted(metrics)],
               "val_loss": summary["val_loss"], "specs": summary["param_specs"],
               "resumed_val_loss": again["val_loss"], "resumed_start": again["start_step"]}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         # The reruns reuse the compiled eval step of the first runs.
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
         # Compiling the train and eval steps is most of the time: XLA's optimisations would add
         # ~40% and the tiny model needs no speed (every run here compiles with the same options).
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split("RESULT")[1])
  one = out["1"]
  for name in ("4x2",):
    assert len(out[name]["loss"]) == len(one["loss"]) == 3
    assert out[name]["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6), name
    assert out[name]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
  for result in out.values():
    assert result["resumed_start"] == 3 and result["resumed_val_loss"] == result["val_loss"]
  # The parameters really are split: FSDP on data, heads on model.
  q = "blocks.0.mixer.q_proj.kernel"
  assert one["specs"][q] == [None, None]
  assert out["4x2"]["specs"]["embed.embedding"] == ["data", None]
  assert out["4x2"]["specs"][q] == ["data", "model"]
