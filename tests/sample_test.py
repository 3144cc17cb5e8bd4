"""The sampling CLI (gdn_jax.sample) end to end on a tiny checkpoint written by gdn_jax.train, and
its one-line errors for missing or incompatible workdirs and bad flags."""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax import sample as sample_lib
from gdn_jax.data import tokenizer
from gdn_jax.generate import generate

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 1-layer run of configs/tiny.py on the embedded corpus, checkpoints at steps 2 and 4."""
  from configs import tiny
  from gdn_jax import train
  c = tiny.get_config()
  c.model.update(d_model=32, num_layers=1, num_heads=2, head_k_dim=16, head_v_dim=16,
                 chunk_size=16, rule_impl="chunked")
  c.data.update(seq_len=32, batch_size=4)
  c.optimizer.update(warmup_steps=1)
  c.train.update(num_steps=4, log_every=2, eval_every=0, eval_batches=1, checkpoint_every=2,
                 sample_tokens=0)
  path = tmp_path_factory.mktemp("run") / "wd"
  train.train(c, str(path), log=lambda *a: None)
  return path


def run_cli(*flags):
  return subprocess.run([sys.executable, "-m", "gdn_jax.sample", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(workdir):
  out = run_cli(f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=20",
                "--temperature=0")
  assert out.returncode == 0, out.stderr
  text = out.stdout.rstrip("\n")
  assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
  # The CLI's greedy text is what generate gives on the restored latest checkpoint.
  model, step = sample_lib.load_model(workdir)
  assert step == 4
  tokens = generate(model, jnp.asarray(tokenizer.encode("ROMEO:")[None], jnp.int32), 20,
                    temperature=0.0, rng=jax.random.key(0))
  assert text == tokenizer.decode(np.asarray(tokens[0]))


def test_cli_error_is_one_line_with_status_1(workdir):
  out = run_cli(f"--workdir={workdir}", "--prompt=x", "--step=3")
  assert out.returncode == 1 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      f"error: --step=3 has no checkpoint in '{workdir.absolute() / 'checkpoints'}'; available "
      "steps: 2, 4."]


def test_step_selects_the_checkpoint(workdir):
  two, step = sample_lib.load_model(workdir, step=2)
  four, _ = sample_lib.load_model(workdir)
  assert step == 2
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), nnx.state(two, nnx.Param),
                      nnx.state(four, nnx.Param))
  assert max(jax.tree.leaves(diff)) > 0       # two more training steps moved the parameters
  a = sample_lib.sample(workdir, "To be", max_new_tokens=8, temperature=1.0, top_k=5, step=2)
  b = sample_lib.sample(workdir, "To be", max_new_tokens=8, temperature=1.0, top_k=5, step=2)
  assert a == b and a.startswith("To be")      # seeded


def copy_run(workdir, tmp_path, edit=None, checkpoints=True):
  """A copy of the run's workdir with config.json edited by `edit(dict)`."""
  dst = tmp_path / "copy"
  dst.mkdir(parents=True)
  config = json.loads((workdir / "config.json").read_text())
  if edit:
    edit(config)
  (dst / "config.json").write_text(json.dumps(config))
  if checkpoints:
    shutil.copytree(workdir / "checkpoints", dst / "checkpoints")
  return dst


def _set(path, value):
  def edit(config):
    *parents, last = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  return edit


def test_workdir_errors(workdir, tmp_path):
  err = lambda **kw: pytest.raises(sample_lib.SampleError, **kw)
  with err(match="is not a directory; expected the --workdir of a gdn_jax.train run"):
    sample_lib.sample(tmp_path / "missing", "a")
  with err(match="config.json' not found"):
    sample_lib.sample(tmp_path, "a")
  (tmp_path / "config.json").write_text("{not json")
  with err(match="is not valid JSON"):
    sample_lib.sample(tmp_path, "a")
  (tmp_path / "config.json").unlink()
  with err(match=r"no checkpoint in .*checkpoints"):
    sample_lib.sample(copy_run(workdir, tmp_path / "a", checkpoints=False), "a")
  with err(match=r"cannot build this run's model: .*d_model"):
    sample_lib.sample(copy_run(workdir, tmp_path / "b", _set("model.d_model", -3)), "a")
  with err(match=r"cannot build this run's model: .*unknown fields \['rotary'\]"):
    sample_lib.sample(copy_run(workdir, tmp_path / "c", _set("model.rotary", True)), "a")
  with err(match=r"checkpoint 4 in .* does not fit the model that .*config.json builds with the "
                 r"current code: blocks.0.mixer.a_proj.kernel is \[32, 2\] in the checkpoint, "
                 r"\[64, 2\] in the model; .* \d+ more shapes differ"):
    sample_lib.sample(copy_run(workdir, tmp_path / "d", _set("model.d_model", 64)), "a")
  with err(match=r"not in the checkpoint: blocks.1."):
    sample_lib.sample(copy_run(workdir, tmp_path / "e", _set("model.num_layers", 2)), "a")


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": ""}, "--prompt='' is empty"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 257}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_flag_errors(workdir, kwargs, match):
  kwargs = {"prompt": "a", **kwargs}
  with pytest.raises(sample_lib.SampleError if "prompt" in match else ValueError, match=match):
    sample_lib.sample(workdir, kwargs.pop("prompt"), **kwargs)
