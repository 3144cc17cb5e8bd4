"""gdn_jax.sweep: many learning rates in one vmapped program == the same runs one by one."""
import numpy as np
import pytest

from gdn_jax import model as model_lib
from gdn_jax import sweep


def tiny_config(width=32):
  return model_lib.ModelConfig(vocab_size=256, d_model=width, num_layers=1, num_heads=2,
                               head_k_dim=width // 2, head_v_dim=width // 2, mlp_hidden=2 * width,
                               chunk_size=16, rule_impl="chunked")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_vmapped_learning_rates_equal_sequential_runs(optimizer):
  tokens = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint8)
  batches = sweep.window_sampler(tokens, batch_size=2, seq_len=16, seed=0)
  val = sweep.fixed_windows(tokens, batch_size=2, seq_len=16, num_batches=1)
  lrs = [1e-3, 1e-2] if optimizer == "adamw" else [1e-2, 1e-1]
  kw = dict(steps=4, parametrization="mup", optimizer=optimizer, base_config=tiny_config(32),
            warmup_steps=2, momentum=0.9 if optimizer == "sgd" else 0.0, seed=0)
  vec = sweep.train_learning_rates(tiny_config(64), lrs, batches, val, vectorize=True, **kw)
  seq = sweep.train_learning_rates(tiny_config(64), lrs, batches, val, vectorize=False, **kw)
  assert vec.train_loss.shape == (2, 4)
  np.testing.assert_allclose(vec.train_loss, seq.train_loss, rtol=2e-5)
  np.testing.assert_allclose(vec.val_loss, seq.val_loss, rtol=2e-5)
  # The learning rate matters: the two replicas must have diverged from each other.
  assert abs(vec.train_loss[0, -1] - vec.train_loss[1, -1]) > 1e-4
  # Step 0 sees the same parameters in every replica.
  assert vec.train_loss[0, 0] == pytest.approx(vec.train_loss[1, 0], rel=1e-6)


def test_grouped_learning_rates_equal_one_program():
  """max_lrs_per_program=2 over 3 LRs: two groups, the last one padded; same losses as one vmap."""
  tokens = np.random.default_rng(1).integers(0, 256, size=5000).astype(np.uint8)
  batches = sweep.window_sampler(tokens, batch_size=2, seq_len=16, seed=0)
  val = sweep.fixed_windows(tokens, batch_size=2, seq_len=16, num_batches=1)
  kw = dict(steps=3, parametrization="mup", optimizer="adamw", base_config=tiny_config(32),
            warmup_steps=1, seed=0)
  lrs = [1e-3, 3e-3, 1e-2]
  one = sweep.train_learning_rates(tiny_config(64), lrs, batches, val, **kw)
  grouped = sweep.train_learning_rates(tiny_config(64), lrs, batches, val, max_lrs_per_program=2,
                                       **kw)
  assert grouped.train_loss.shape == (3, 3) and grouped.val_loss.shape == (3,)
  np.testing.assert_allclose(grouped.train_loss, one.train_loss, rtol=2e-5)
  np.testing.assert_allclose(grouped.val_loss, one.val_loss, rtol=2e-5)
  assert len(set(np.round(grouped.val_loss, 6))) == 3      # three distinct runs, none dropped
  with pytest.raises(ValueError, match="max_lrs_per_program"):
    sweep.train_learning_rates(tiny_config(64), lrs, batches, val, max_lrs_per_program=0, **kw)


def test_warmup_cosine_schedule():
  f = lambda t: float(sweep.warmup_cosine(t, total_steps=100, warmup_steps=10, final_fraction=0.1))
  assert f(0) == pytest.approx(0.1)
  assert f(9) == pytest.approx(1.0)
  assert f(10) == pytest.approx(1.0)
  assert f(55) == pytest.approx(0.55, abs=1e-6)
  assert f(100) == pytest.approx(0.1)


def test_window_sampler_is_deterministic_and_in_range():
  tokens = np.arange(1000, dtype=np.int64) % 256
  a = sweep.window_sampler(tokens, 3, 8, seed=1)
  b = sweep.window_sampler(tokens, 3, 8, seed=1)
  np.testing.assert_array_equal(a(5), b(5))
  assert a(5).shape == (3, 9)
  assert not np.array_equal(a(5), a(6))
  windows = a(7)
  assert np.all((windows[:, 1:] - windows[:, :-1]) % 256 == 1)   # contiguous windows


def test_gradient_norm_and_clipping():
  """grad_norm is the global norm of the raw gradient (checked at step 0 against nnx.grad of the
  same model); a threshold above every norm changes nothing, one below the norms changes the run."""
  import jax
  import optax
  from flax import nnx
  from gdn_jax import mup
  from gdn_jax.loss import cross_entropy

  tokens = np.random.default_rng(2).integers(0, 256, size=5000).astype(np.uint8)
  batches = sweep.window_sampler(tokens, batch_size=2, seq_len=16, seed=0)
  val = sweep.fixed_windows(tokens, batch_size=2, seq_len=16, num_batches=1)
  kw = dict(steps=3, parametrization="mup", optimizer="sgd", base_config=tiny_config(32),
            warmup_steps=1, momentum=0.9, seed=0)
  free = sweep.train_learning_rates(tiny_config(64), [0.1], batches, val, **kw)
  model = mup.build_model(tiny_config(64), parametrization="mup", base_config=tiny_config(32),
                          rngs=nnx.Rngs(0))
  b0 = batches(0)
  grads = nnx.grad(lambda m: cross_entropy(m(b0[:, :-1]), b0[:, 1:]))(model)
  assert free.grad_norm[0, 0] == pytest.approx(float(optax.global_norm(jax.tree.leaves(grads))),
                                               rel=1e-4)
  loose = sweep.train_learning_rates(tiny_config(64), [0.1], batches, val,
                                     grad_clip=10 * free.grad_norm.max(), **kw)
  np.testing.assert_allclose(loose.train_loss, free.train_loss, rtol=1e-6)
  tight = sweep.train_learning_rates(tiny_config(64), [0.1], batches, val,
                                     grad_clip=0.1 * free.grad_norm.min(), **kw)
  assert tight.grad_norm[0, 0] == pytest.approx(free.grad_norm[0, 0], rel=1e-6)  # before clipping
  assert abs(tight.train_loss[0, -1] - free.train_loss[0, -1]) > 1e-4


def test_loss_spike():
  falling = np.linspace(3.0, 1.0, 50)
  assert sweep.loss_spike(falling, window=1) == 0.0
  spiked = falling.copy()
  spiked[30:35] += 2.0                       # up by 2 above the running minimum, then back
  assert sweep.loss_spike(spiked, window=1) == pytest.approx(2.0 - (falling[29] - falling[30]))
  assert 0.7 < sweep.loss_spike(spiked, window=10) < 1.0      # smoothed: 5 of 10 steps are up
  assert np.isnan(sweep.loss_spike(np.array([1.0, np.nan, 1.0])))
