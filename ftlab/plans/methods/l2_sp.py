"""L2-SP (Li et al., ICML 2018): regularise toward the starting point, not toward zero.

`l2_sp(alpha, beta)` adds the gradient of `alpha/2 ||w - w0||^2` for each pretrained trainable
leaf (w0: its loaded value) and of `beta/2 ||w||^2` for the new head, where weight decay would
add one toward zero (with `weight_decay=0` it replaces it). The loaded values are copied into
the optimizer state when it is made, so a resumed run pulls toward the same point.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ftlab import paths as paths_
from ftlab.plans import registry
from ftlab.plans.registry import Call, Modifier, Param, PlanError


class L2SPState(NamedTuple):
  anchor: Any  # the loaded value of each pretrained leaf (None for the head: toward 0)


def add_l2_sp(
  coefficients: Mapping[str, tuple[float, bool]], anchor: Mapping[str, Any]
) -> optax.GradientTransformation:
  """Adds the gradient of `coef/2 ||w - w0||^2` (w0 = `anchor[path]`, or 0 for the head).

  Args:
    coefficients: `{path: (coefficient, toward_anchor)}` of the trainable leaves.
    anchor: the loaded parameters by path; they are copied into the optimizer state at
      `init`, so a resumed run pulls toward the same point.
  """

  def init(params):
    def leaf(kp, x):
      coef, toward_anchor = coefficients[paths_.from_key_path(kp)]
      if not (toward_anchor and coef):
        return None
      # A copy in the optimizer state, not a reference to the run's loaded tree: checkpoints save
      # it, so a resume pulls toward the same point even if the init weights changed on disk.
      return jnp.asarray(anchor[paths_.from_key_path(kp)], x.dtype)

    return L2SPState(jax.tree_util.tree_map_with_path(leaf, params))

  def update(updates, state, params):
    coefs = jax.tree_util.tree_map_with_path(
      lambda kp, _: coefficients.get(paths_.from_key_path(kp), (None,))[0], updates
    )

    def leaf(u, c, w, w0):
      # Added to the gradient before momentum or Adam (see `optim.make`), like coupled L2: with
      # Adam the pull is rescaled per entry.
      return u if not c else u + c * (w - w0 if w0 is not None else w)

    is_none = lambda x: x is None
    updates = jax.tree.map(leaf, updates, coefs, params, state.anchor, is_leaf=is_none)
    return updates, state

  return optax.GradientTransformation(init, update)


@registry.register
class L2SP(Modifier):
  name = 'l2_sp'
  params = (Param('alpha', 0.0), Param('beta', 0.0))
  summary = (
    'alpha/2 ‖w − w0‖² toward the loaded weights, beta/2 ‖w‖² on the head (with '
    '`weight_decay=0` it replaces decay toward zero)'
  )
  paper = 'Li et al., ICML 2018'

  def term(
    self, call: Call, paths: list[str], structure: Any, trainable: set[str]
  ) -> dict[str, tuple[float, bool]]:
    """`{path: (coefficient, toward_anchor)}` of the trainable leaves: alpha toward the
    loaded value for pretrained leaves, beta toward zero for the head."""
    alpha, beta = call.get('alpha', 0.0), call.get('beta', 0.0)
    for key, value in (('alpha', alpha), ('beta', beta)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise PlanError(f'l2_sp: {key}={value!r} is not a non-negative number')
    head = set(structure.head.layers)
    return {
      # The new head has no pretrained value to return to: it is pulled toward zero, with beta.
      p: (float(beta), False) if paths_.layer_of(p) in head else (float(alpha), True)
      for p in paths
      if p in trainable
    }

  def transform(self, term: Any, anchor: Mapping[str, Any] | None) -> Any:
    if anchor is None:
      raise ValueError('plan uses l2_sp but no anchor (the loaded parameters) was given')
    return add_l2_sp(term, anchor)

  def describe(self, term: Any) -> str:
    return 'L2-SP: pretrained leaves pulled toward their loaded values, the head toward 0'
