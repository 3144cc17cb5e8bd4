"""gdn_jax.sweep: a grid of (seed, LR) replicas in one program == the trainer's step run alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn_jax import sweep
from gdn_jax import train as train_lib


def grid_config(optimizer="adamw", parametrization="mup", steps=4):
  """configs/tiny.py at a test size: 1 layer, width 32 (μP base 16), T = 16, B = 2."""
  from configs import tiny
  c = tiny.get_config()
  c.model.update(d_model=32, num_layers=1, num_heads=2, head_k_dim=16, head_v_dim=16,
                 mlp_hidden=64, chunk_size=16, rule_impl="chunked")
  c.mup_base.update(d_model=16, num_heads=1)
  c.parametrization = parametrization
  c.optimizer.update(name=optimizer, warmup_steps=2, momentum=0.9 if optimizer == "sgd" else 0.0,
                     nesterov=optimizer == "sgd", grad_clip=1.0)
  c.data.update(seq_len=16, batch_size=2)
  c.train.num_steps = steps
  return c


TOKENS = np.random.default_rng(0).integers(0, 256, size=4000).astype(np.uint8)
VAL = sweep.fixed_windows(TOKENS, batch_size=2, seq_len=16, num_batches=2)


@pytest.mark.parametrize("optimizer,parametrization", [("adamw", "mup"), ("sgd", "paper")])
def test_grid_replicas_equal_the_trainers_step_run_alone(optimizer, parametrization):
  c = grid_config(optimizer, parametrization)
  lrs = [1e-3, 1e-2] if optimizer == "adamw" else [1e-2, 1e-1]
  grid = sweep.train_grid(c, lrs, [0, 3], TOKENS, VAL)
  assert grid.train_loss.shape == (2, 2, 4) and grid.val_loss.shape == (2, 2)
  # The trainer's step and loss, compiled once: the replicas' models differ in their values only
  # (the same graph, checked below), and the LR is the step's argument, as in gdn_jax.train.
  model0 = train_lib.build_model(c, seed=0)
  graphdef0, tx = nnx.split(model0)[0], train_lib.make_tx(model0, c)
  step = jax.jit(train_lib.make_train_step(graphdef0, tx))
  loss_fn = jax.jit(train_lib.make_loss_fn(graphdef0))
  for si, seed in enumerate((0, 3)):
    for li, lr in enumerate(lrs):
      model = train_lib.build_model(c, seed=seed)          # what gdn_jax.train builds
      graphdef, params = nnx.split(model)
      assert graphdef == graphdef0
      opt_state = train_lib.make_tx(model, c).init(params)
      starts = sweep.epoch_starts(len(TOKENS), seq_len=16, steps=4, batch_size=2, seed=seed)
      losses, norms = [], []
      for t in range(4):
        batch = np.stack([TOKENS[s:s + 17] for s in starts[t]]).astype(np.int32)
        params, opt_state, m = step(params, opt_state, jnp.asarray(batch), lr)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
      np.testing.assert_allclose(grid.train_loss[si, li], losses, rtol=2e-5)
      np.testing.assert_allclose(grid.grad_norm[si, li], norms, rtol=1e-4)
      val = np.mean([float(loss_fn(params, b)) for b in VAL])
      np.testing.assert_allclose(grid.val_loss[si, li], val, rtol=2e-5)
  # The learning rate and the seed both matter; step 0 is the same init within a seed.
  assert abs(grid.train_loss[0, 0, -1] - grid.train_loss[0, 1, -1]) > 1e-4
  assert grid.train_loss[0, 0, 0] == grid.train_loss[0, 1, 0] != grid.train_loss[1, 0, 0]
  assert grid.model_flops > 0 and grid.programs == 1


def test_grouped_replicas_equal_one_program():
  c = grid_config(steps=3)
  one = sweep.train_grid(c, [1e-3, 3e-3, 1e-2], [0, 1], TOKENS, VAL)
  grouped = sweep.train_grid(c, [1e-3, 3e-3, 1e-2], [0, 1], TOKENS, VAL,
                             max_replicas_per_program=4)
  assert grouped.programs == 2
  np.testing.assert_allclose(grouped.train_loss, one.train_loss, rtol=2e-5)
  np.testing.assert_allclose(grouped.val_loss, one.val_loss, rtol=2e-5)
  assert len(set(np.round(grouped.val_loss.ravel(), 6))) == 6      # six distinct runs
  with pytest.raises(ValueError, match="max_replicas_per_program"):
    sweep.train_grid(c, [1e-3], [0], TOKENS, VAL, max_replicas_per_program=0)
  with pytest.raises(ValueError, match="val_batches"):
    sweep.train_grid(c, [1e-3], [0], TOKENS, VAL[:, :, :5])


def test_the_pallas_kernels_inside_the_vmapped_program_equal_the_xla_rule():
  """rule_impl "pallas" (interpret mode on CPU): pallas_call and its custom VJP batched over the
  replicas by vmap, inside the scan over steps, train as the pure-JAX chunked rule does."""
  runs = {}
  for impl in ("chunked", "pallas"):
    c = grid_config(steps=3)
    c.model.rule_impl = impl
    runs[impl] = sweep.train_grid(c, [1e-3, 1e-2], [0, 1], TOKENS, VAL)
  np.testing.assert_allclose(runs["pallas"].train_loss, runs["chunked"].train_loss, rtol=1e-5)
  np.testing.assert_allclose(runs["pallas"].grad_norm, runs["chunked"].grad_norm, rtol=1e-4)
  np.testing.assert_allclose(runs["pallas"].val_loss, runs["chunked"].val_loss, rtol=1e-5)
  assert abs(runs["pallas"].val_loss[0, 0] - runs["pallas"].val_loss[0, 1]) > 1e-4


def test_divergence_counts_and_marks_the_run():
  c = grid_config(steps=3)
  c.optimizer.grad_clip = 0.0
  grid = sweep.train_grid(c, [1e-3, 1e9], [0], TOKENS, VAL)
  assert grid.nonfinite_steps[0, 0] == 0 and np.isfinite(grid.val_loss[0, 0])
  assert grid.nonfinite_steps[0, 1] > 0 and np.isnan(grid.val_loss[0, 1])


def test_epoch_starts_never_repeat_a_window():
  starts = sweep.epoch_starts(1000, seq_len=8, steps=12, batch_size=10, seed=1)
  assert starts.shape == (12, 10)
  assert len(set(starts.ravel())) == 120 and np.all(starts % 8 == 0)
  assert starts.max() + 9 <= 1000
  np.testing.assert_array_equal(starts, sweep.epoch_starts(1000, seq_len=8, steps=12,
                                                           batch_size=10, seed=1))
  assert not np.array_equal(starts, sweep.epoch_starts(1000, seq_len=8, steps=12, batch_size=10,
                                                       seed=2))
  with pytest.raises(ValueError, match="never repeat"):
    sweep.epoch_starts(1000, seq_len=8, steps=13, batch_size=10, seed=1)


def test_loss_spike():
  falling = np.linspace(3.0, 1.0, 50)
  assert sweep.loss_spike(falling, window=1) == 0.0
  spiked = falling.copy()
  spiked[30:35] += 2.0                       # up by 2 above the running minimum, then back
  assert sweep.loss_spike(spiked, window=1) == pytest.approx(2.0 - (falling[29] - falling[30]))
  assert 0.7 < sweep.loss_spike(spiked, window=10) < 1.0      # smoothed: 5 of 10 steps are up
  assert np.isnan(sweep.loss_spike(np.array([1.0, np.nan, 1.0])))


def test_the_program_can_use_its_donated_buffers(monkeypatch):
  """On accelerators the replicas' parameters and optimizer state are donated; the program must
  return them so that XLA can alias the loop's state to them (else jax warns "Some donated
  buffers were not usable" and the state is held twice). Lowered here as on a GPU."""
  import warnings
  monkeypatch.setattr(sweep.jax, "default_backend", lambda: "gpu")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    grid = sweep.train_grid(grid_config(), [1e-3, 1e-2], [0], TOKENS, VAL)
  assert not [w for w in caught if "donated buffers were not usable" in str(w.message)]
  assert np.isfinite(grid.val_loss).all()
