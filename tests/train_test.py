"""Training library + CLI: LR schedule, config overrides, config/data errors, non-finite losses."""
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from gdn_jax import mup
from gdn_jax import train as train_lib
from gdn_jax.data import pipeline, prepare

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.py")


def make_token_files(directory, num_bytes=120_000) -> dict:
  """Token files from the start of the embedded corpus (fast to build, real text)."""
  text = next(prepare.read_documents(prepare.EMBEDDED_CORPUS))[:num_bytes]
  return {k: str(v) for k, v in prepare.write_token_files([text], directory).items()}


def tiny_config(paths: dict, **train):
  """configs/tiny.py shrunk to a test size (1 layer, D=32, T=32, B=4)."""
  from configs import tiny
  c = tiny.get_config()
  c.model.update(d_model=32, num_layers=1, num_heads=2, head_k_dim=16, head_v_dim=16,
                 chunk_size=16, rule_impl="chunked")
  c.data.update(train_path=paths["train"], val_path=paths["val"], seq_len=32, batch_size=4)
  c.optimizer.update(warmup_steps=2)
  c.train.update(num_steps=6, log_every=1, eval_every=0, eval_batches=2, checkpoint_every=2,
                 sample_tokens=0)
  c.train.update(**train)
  return c


def read_metrics(workdir) -> dict[int, dict]:
  """step → the last training record logged for it (a resumed run logs some steps twice)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      out[record["step"]] = record
  return out


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return make_token_files(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_formula(schedule):
  from configs import tiny
  c = tiny.get_config()
  c.optimizer.update(lr=2e-3, warmup_steps=10, final_lr_fraction=0.1, schedule=schedule)
  c.train.num_steps = 110
  sched = train_lib.lr_schedule(c)
  for count in (0, 4, 9, 10, 35, 60, 109, 110):
    if count < 10:
      expected = 2e-3 * (count + 1) / 10
    else:
      s = (count - 10) / 100
      expected = {"cosine": 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s))),
                  "linear": 2e-3 * (1 - 0.9 * s), "constant": 2e-3}[schedule]
    np.testing.assert_allclose(float(sched(count)), expected, rtol=1e-5)


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_cli_overrides_reach_the_config():
  config = _parse(["gdn-train", f"--config={TINY}", "--config.optimizer.lr=0.003",
                   "--config.model.d_model=64", "--config.optimizer.schedule=linear",
                   "--config.model.output_norm_eps=1e-3"])
  assert config.optimizer.lr == 0.003
  assert config.optimizer.schedule == "linear"
  assert train_lib.model_config(config).d_model == 64
  assert train_lib.model_config(config).resolved_output_norm_eps == 1e-3
  default = _parse(["gdn-train", f"--config={TINY}"])
  assert train_lib.model_config(default).resolved_output_norm_eps == default.model.norm_eps
  with pytest.raises(Exception, match="no_such_field"):  # locked config: typos are errors
    _parse(["gdn-train", f"--config={TINY}", "--config.optimizer.no_such_field=1"])


def _documented_overrides():
  """Every `--config.SECTION.FIELD=VALUE` the README and docs/ show a user."""
  docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
  found = set()
  for path in docs:
    found |= set(re.findall(r"--config\.([a-z_]+\.[a-z_]+)=([^\s`'\"]+)", path.read_text()))
  return sorted(found)


@pytest.mark.parametrize("config_file", ["tiny.py", "gpu.py"])
def test_every_documented_override_is_a_field_of_the_configs(config_file):
  """The configs are locked (a typo is an error), so a flag the docs show must name a field that
  configs/tiny.py and configs/gpu.py have, and its value must validate."""
  overrides = _documented_overrides()
  assert {"model.loss_chunk_size", "optimizer.embedding_lr_scale"} <= {f for f, _ in overrides}
  path = str(REPO / "configs" / config_file)
  for field, value in overrides:
    if "<" in value or value.startswith("$"):        # a placeholder, e.g. =<path>
      continue
    config = _parse(["gdn-train", f"--config={path}", f"--config.{field}={value}"])
    section, name = field.split(".")
    assert name in config[section], field
    if section == "model" and config_file == "gpu.py":   # rule_impl "auto", as the docs assume
      train_lib.model_config(config)                  # the value is a valid ModelConfig field


@pytest.mark.parametrize("field, value, match", [
    ("optimizer.lr", -1.0, "optimizer.lr"),
    ("optimizer.schedule", "exp", "optimizer.schedule"),
    ("optimizer.warmup_steps", 10**6, "optimizer.warmup_steps"),
    ("train.on_nonfinite", "ignore", "train.on_nonfinite"),
    ("data.seq_len", 0, "data.seq_len"),
    ("model.d_model", 0, "d_model"),
    ("model.rule_impl", "magic", "rule_impl"),
    ("model.output_norm_eps", -1e-3, "output_norm_eps"),
    ("model.qk_norm_eps", -1.0, "qk_norm_eps"),
    ("optimizer.lr_overrides", "embed:out:x", "optimizer.lr_overrides"),
    ("optimizer.lr_overrides", "embed:out:-1,no_such_param:-1", "optimizer.lr_overrides"),
    ("optimizer.embedding_lr_scale", 0.0, "optimizer.embedding_lr_scale"),
    ("optimizer.embedding_lr_scale", float("inf"), "optimizer.embedding_lr_scale"),
])
def test_bad_config_values_write_nothing(tmp_path, paths, field, value, match):
  c = tiny_config(paths)
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    train_lib.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_lr_overrides_scale_only_the_named_parameters(paths):
  """optimizer.lr_overrides reaches the optimizer: at width 2× the base, "embed:out:-1" halves
  the embedding's SGD step and leaves every other parameter's step as it was."""
  c = tiny_config(paths)
  c.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0, warmup_steps=0)
  c.mup_base.update(d_model=16, num_heads=1)
  model = train_lib.build_model(c, seed=0)
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, params)

  def steps(spec):
    c.optimizer.lr_overrides = spec
    train_lib.validate_config(c)
    tx = train_lib.make_tx(model, c)
    return dict(nnx.to_flat_state(tx.update(grads, tx.init(params), params)[0]))

  plain, overridden = steps(""), steps("embed:out:-1")
  for path, update in plain.items():
    ratio = np.asarray(overridden[path][...]) / np.asarray(update[...])
    np.testing.assert_allclose(ratio, 0.5 if "embed" in path else 1.0, rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("parametrization", ["mup", "sp"])
def test_embedding_lr_scale_scales_the_embeddings_step_at_every_width(paths, parametrization):
  """optimizer.embedding_lr_scale reaches the optimizer: the embedding's SGD step × C, at the
  base width too and for SP as for μP, every other step unchanged; the same steps as the
  lr_overrides factor "embed:x:C"."""
  c = tiny_config(paths)
  c.parametrization = parametrization
  c.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0, warmup_steps=0)
  for base in (dict(d_model=32, num_heads=2), dict(d_model=16, num_heads=1)):
    c.mup_base.update(**base)
    model = train_lib.build_model(c, seed=0)
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)

    def steps(scale, overrides=""):
      c.optimizer.update(embedding_lr_scale=scale, lr_overrides=overrides)
      train_lib.validate_config(c)
      tx = train_lib.make_tx(model, c)
      return dict(nnx.to_flat_state(tx.update(grads, tx.init(params), params)[0]))

    plain, scaled, factor = steps(1.0), steps(0.0625), steps(1.0, "embed:x:0.0625")
    for path, update in plain.items():
      ratio = np.asarray(scaled[path][...]) / np.asarray(update[...])
      np.testing.assert_allclose(ratio, 0.0625 if "embed" in path else 1.0, rtol=1e-6,
                                 err_msg=path)
      np.testing.assert_array_equal(scaled[path][...], factor[path][...], err_msg=path)


def test_sp_through_the_trainer_is_tp5s_fan_in_sp_relative_to_the_base(paths):
  """parametrization "sp" with a base (config.mup_base) draws every matrix that reads a grown
  dimension with fan-in std, × (fan_in / base fan_in)^-½, as mup.build_model(base_config=...)
  does; the model as its own base (mup_base all 0) keeps init_std (the sweeps' `const_init`)."""
  c = tiny_config(paths)
  c.parametrization = "sp"
  own = train_lib.build_model(c, seed=0)
  c.mup_base.update(d_model=16, num_heads=1)      # the model: d_model 32, 2 heads
  model = train_lib.build_model(c, seed=0)
  expect = mup.build_model(train_lib.model_config(c), parametrization="sp",
                           base_config=train_lib.base_model_config(c), rngs=nnx.Rngs(0))
  flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  got, want = flat(model), flat(expect)
  for path, value in got.items():
    np.testing.assert_array_equal(value[...], want[path][...], err_msg=str(path))
  # The read-out reads d_model (2× the base's): its draw × 2^-½; the embedding reads the vocab.
  np.testing.assert_allclose(model.lm_head.kernel[...], own.lm_head.kernel[...] * 2 ** -0.5,
                             rtol=1e-6)
  np.testing.assert_array_equal(model.embed.embedding[...], own.embed.embedding[...])


def test_train_step_applies_the_peak_lr_and_the_schedule(paths):
  """The one train step: θ₁ = θ₀ − peak · factor(0) · r_p · g for plain SGD (no clipping), with
  g the gradient of the loss and r_p the μP LR multiplier of each parameter."""
  c = tiny_config(paths)
  c.optimizer.update(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip=0.0, warmup_steps=4,
                     lr=0.3)
  c.mup_base.update(d_model=16, num_heads=1)
  model = train_lib.build_model(c, seed=0)
  tx = train_lib.make_tx(model, c)
  graphdef, params = nnx.split(model)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 33)), jnp.int32)
  new, _, metrics = train_lib.make_train_step(graphdef, tx)(params, tx.init(params), batch, 0.3)
  grads = jax.grad(train_lib.make_loss_fn(graphdef))(params, batch)
  groups = {".".join(map(str, k)): g for k, g in mup.param_groups(
      model, parametrization="mup", optimizer="sgd",
      base_config=train_lib.base_model_config(c)).items()}
  factor = 1 / 4                                            # warmup: (0 + 1) / 4
  for path, g in nnx.to_flat_state(grads):
    name = ".".join(map(str, path))
    before, after = dict(nnx.to_flat_state(params))[path], dict(nnx.to_flat_state(new))[path]
    np.testing.assert_allclose(np.asarray(after[...]), np.asarray(before[...]) - 0.3 * factor *
                               groups[name].lr * np.asarray(g[...]), rtol=1e-5, atol=1e-7,
                               err_msg=name)
  assert bool(metrics["finite"])


def test_missing_and_corrupt_data_write_nothing(tmp_path, paths):
  c = tiny_config(paths)
  c.data.train_path = str(tmp_path / "nope.npy")
  with pytest.raises(ValueError, match="does not exist"):
    train_lib.train(c, str(tmp_path / "run"))
  bad = tmp_path / "bad.npy"
  bad.write_bytes(b"\x93NUMPY garbage")
  c.data.train_path = str(bad)
  with pytest.raises(ValueError, match="corrupt"):
    train_lib.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def _poison_targets(paths, config):
  """A byte that is the first target of batch `steps[0]` only among the run's batches."""
  it = pipeline.train_iterator(paths["train"], seq_len=config.data.seq_len,
                               batch_size=config.data.batch_size, seed=config.seed)
  firsts = [int(next(it)[0, 1]) for _ in range(config.train.num_steps)]
  for s in range(2, config.train.num_steps):  # steps are 1-based: batch s−1
    if firsts.count(firsts[s]) == 1:
      return firsts[s], s + 1
  pytest.skip("no unique first target in this data")


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss(tmp_path, paths, monkeypatch, mode):
  c = tiny_config(paths, on_nonfinite=mode, checkpoint_every=2)
  byte, bad_step = _poison_targets(paths, c)
  from gdn_jax import model as model_lib
  original = model_lib.cross_entropy
  # NaN exactly on the batch whose first target is `byte` (an independent, data-driven trigger).
  monkeypatch.setattr(model_lib, "cross_entropy", lambda logits, targets: original(
      logits, targets) * jnp.where(targets[0, 0] == byte, jnp.nan, 1.0))
  workdir = tmp_path / "run"
  if mode == "stop":
    with pytest.raises(train_lib.NonFiniteLossError, match=f"step {bad_step}\\b"):
      train_lib.train(c, str(workdir), log=lambda s: None)
    from gdn_jax.checkpoint import Checkpointer
    last_good = (bad_step - 1) // 2 * 2
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    assert max(steps, default=0) == last_good, (steps, bad_step)
  else:
    summary = train_lib.train(c, str(workdir), log=lambda s: None)
    assert summary["skipped"] == 1 and summary["step"] == c.train.num_steps
    metrics = read_metrics(workdir)
    assert metrics[bad_step].get("skipped") and math.isnan(metrics[bad_step]["loss"])
    assert all(math.isfinite(m["loss"]) for s, m in metrics.items() if s != bad_step)


def test_workdir_with_other_config_is_refused(tmp_path, paths):
  from gdn_jax.checkpoint import check_or_write_config
  c = tiny_config(paths)
  workdir = tmp_path / "run"
  assert not check_or_write_config(workdir, c.to_json())  # as a first run of `c` leaves it
  (workdir / "checkpoints").mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  c.optimizer.lr = 1e-3
  with pytest.raises(ValueError, match="optimizer.lr: 0.003 in the workdir, 0.001 now"):
    train_lib.train(c, str(workdir), log=lambda s: None)
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert before == after
