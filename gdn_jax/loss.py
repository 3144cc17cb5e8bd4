"""The language-modelling loss shared by training, sweeps and the coordinate check."""
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxTxV, targets_BxT) -> jax.Array:
  """Mean next-token cross-entropy (nats), computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), targets_BxT).mean()
