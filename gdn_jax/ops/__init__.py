"""Pure functions on arrays: the gated delta rule and its implementations."""
from gdn_jax.ops.gated_delta_rule import IMPLS, default_impl, gated_delta_rule, l2_normalize

__all__ = ["IMPLS", "default_impl", "gated_delta_rule", "l2_normalize"]
