"""experiments/sgd_gap_probe.py: its variants of the project's μP are that μP at the base width
(the probe compares them at 256 against runs made once at 32) and differ from it when wider."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import sgd_gap_probe
from gdn_jax import families, mup
from gdn_jax.mup import tables


@pytest.fixture(autouse=True)
def registered():
  tables.PARAMETRIZATIONS.update(sgd_gap_probe.VARIANTS)
  yield
  for name in sgd_gap_probe.VARIANTS:
    tables.PARAMETRIZATIONS.pop(name)


@functools.lru_cache(maxsize=None)
def logits(parametrization, width, base=16):
  config = families.paper_config(width, num_layers=1, vocab_size=32)
  model = mup.build_model(config, parametrization=parametrization, optimizer="sgd",
                          base_config=families.paper_config(base, num_layers=1, vocab_size=32),
                          rngs=nnx.Rngs(0))
  out = np.asarray(model(jnp.arange(12).reshape(1, 12) % 32))
  out.flags.writeable = False
  return out


@pytest.mark.parametrize("variant", sorted(sgd_gap_probe.VARIANTS))
def test_variants_are_the_project_mup_at_the_base_width_only(variant):
  np.testing.assert_array_equal(logits(variant, 16), logits("mup", 16))
  if "ro1" in variant:      # the tied read-out's multiplier is the forward change
    assert not np.allclose(logits(variant, 32), logits("mup", 32))
  base = families.paper_config(16, num_layers=1, vocab_size=32)
  groups = lambda p: {g.cls: g.lr for g in mup.param_groups(
      mup.build_model(families.paper_config(32, num_layers=1, vocab_size=32), parametrization=p,
                      optimizer="sgd", base_config=base, rngs=nnx.Rngs(0)),
      parametrization=p, optimizer="sgd", base_config=base).values()}
  if "ab_sp" in variant:    # W_a, W_b (output-like here) get SP's LR 1 instead of μP's × m
    assert groups(variant)["output"] == 1.0 and groups("mup")["output"] == 2.0
