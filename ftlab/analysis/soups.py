"""Exact averages of parameter trees: uniform soups, WiSE-FT, and greedy soup selection.

Model soups (Wortsman et al., ICML 2022) average the weights of fine-tuned models; WiSE-FT
(Wortsman et al., CVPR 2022) interpolates `(1 - alpha) theta0 + alpha theta1`. The averages
here are exact for equal inputs: a soup of N copies of a tree is that tree bit for bit, and
WiSE at alpha 0 and 1 returns the endpoints themselves. Host numpy trees in, out.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

PyTree = Any


def mean_tree(trees: Sequence[PyTree]) -> PyTree:
  """Leafwise mean of pytrees of host arrays, bit-identical to x for N copies of x.

  The sum runs in float64, starting from the first tree: N copies of a float32 x add up to N*x
  exactly (24 + log2 N significant bits, far below 53), which divides back to x exactly. A
  float32 `sum / N` would round (x + x + x is not always 3x), and a sum from +0.0 would turn
  -0.0 into +0.0.
  """

  def mean(first, *rest):
    first = np.asarray(first)
    total = first.astype(np.float64)
    for x in rest:
      total += np.asarray(x, np.float64)
    # Cast back to the inputs' dtype: a soup is a drop-in for any member's variables.
    return (total / (1 + len(rest))).astype(first.dtype)

  return jax.tree.map(mean, *trees)


def interpolate(tree0: PyTree, tree1: PyTree, alpha: float) -> PyTree:
  """WiSE-FT: `(1 - alpha) * tree0 + alpha * tree1` leafwise; `tree0` itself at alpha 0 and
  `tree1` itself at alpha 1 (in floating point the formula need not reproduce them exactly)."""
  # The endpoints are returned as they are, not computed: `(1 - 0) * x + 0 * y` is not `x`
  # where `y` holds inf or NaN, nor for -0.0.
  if alpha == 0:
    return tree0
  if alpha == 1:
    return tree1

  def mix(x0, x1):
    x0 = np.asarray(x0)
    mixed = (1 - alpha) * x0.astype(np.float64) + alpha * np.asarray(x1, np.float64)
    return mixed.astype(x0.dtype)

  return jax.tree.map(mix, tree0, tree1)


def trees_identical(a: PyTree, b: PyTree) -> bool:
  """Same structure and every leaf the same bytes (so -0.0 differs from 0.0)."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    np.shape(x) == np.shape(y) and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(leaves_a, leaves_b)
  )


def greedy_soup(
  ranked: Sequence[str],
  make_soup: Callable[[list[str]], PyTree],
  score: Callable[[PyTree], float],
) -> tuple[list[str], PyTree, list[dict]]:
  """Wortsman et al.'s greedy soup over runs already ranked best first.

  Starts from the best run alone, then tries each next run in turn and keeps it when the
  soup's held-out score does not drop (ties join, as in the paper).

  Args:
    ranked: run names, best held-out accuracy first.
    make_soup: names -> the soup's variables (their mean, with fresh BatchNorm statistics).
    score: variables -> held-out accuracy.

  Returns:
    The chosen names, the soup, and one `{candidate, held_out_accuracy, accepted}` per trial.
  """
  chosen, soup = [ranked[0]], make_soup([ranked[0]])
  best = score(soup)
  trials = [{'candidate': ranked[0], 'held_out_accuracy': best, 'accepted': True}]
  for name in ranked[1:]:
    trial = make_soup(chosen + [name])
    trial_score = score(trial)
    # `>=`: a candidate that leaves the held-out score unchanged joins, as in the paper.
    accepted = trial_score >= best
    trials.append({'candidate': name, 'held_out_accuracy': trial_score, 'accepted': accepted})
    if accepted:
      chosen, soup, best = chosen + [name], trial, trial_score
  return chosen, soup, trials
