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
