"""The body of a Pallas kernel as a jaxpr, on CPU: where in a program an operation is traced
(Triton keeps that order, and ptxas cannot hoist a global load above a barrier), e.g. that a
big load is issued before a prologue's reductions."""
import jax
from jax.extend import core as jex_core


def kernel_jaxpr(fn, *args):
  """The kernel jaxpr of the one `pallas_call` in jax.jit(fn)(*args) (nested calls searched)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append(eqn.params["jaxpr"])
      for sub in jex_core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  assert len(found) == 1, f"{len(found)} pallas_calls in {fn}"
  return found[0]


def first_eqn(jaxpr, primitives, reads=None) -> int:
  """Index of the first top-level equation of `jaxpr` whose primitive is in `primitives` (and,
  with `reads`, which takes the ref `reads` as an operand); len(eqns) if none."""
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name in primitives and (reads is None or any(
        v is reads for v in eqn.invars)):
      return i
  return len(jaxpr.eqns)
