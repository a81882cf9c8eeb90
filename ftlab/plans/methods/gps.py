"""GPS: Gradient-based Parameter Selection (Zhang et al., CVPR 2024).

`gps(k, num_batches=None, train_head=True)` trains, for every output unit of every backbone
kernel (the last axis: a conv filter of `[kh, kw, Cin, Cout]`, a dense unit of `[in, out]`),
the `k` incoming weights with the largest gradient magnitude |g|, g the mean loss gradient
over `num_batches` shuffled training batches (every training example once if None), the
model in inference mode (the run's `gradient` score pass). Every unit thus keeps some
trainable weights, unlike a global top-k, which the paper argues is what makes the choice
work. A unit with `k` or fewer incoming weights trains all of them; ties go to the lower
index along the unit's flattened fan-in (`kh, kw, Cin` in row-major order).

Biases: the paper's selection is of weights (connections), and its official code
(`utils/pruning.py`, `prune_by_percentile_gradient_perCell`) trains every bias whole beside
them and freezes the normalisation layers; so here the bias of each scored kernel trains
whole and BatchNorm leaves stay frozen (`gps(k) - bitfit(train_head=False)` for weights
only). The gradients are of the cross-entropy loss (the paper's are of a supervised
contrastive loss).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, Selector
from ftlab.plans.selection import (
  FROZEN,
  TRAINED,
  Context,
  kernel_biases,
  levels_of,
  optional_batches,
  positive_int,
)


def per_unit_top_k(scores: np.ndarray, k: int) -> np.ndarray:
  """A boolean mask of `scores`' shape choosing, for each index of the last axis, the `k`
  largest entries of its slice (all of them where the slice has `k` or fewer); ties go to the
  lower index of the flattened slice, NaN ranks last.

  Args:
    scores: float array `[..., units]`, at least 2-D.
    k: entries per unit, >= 1.
  """
  units = scores.shape[-1]
  by_unit = np.asarray(scores, np.float32).reshape(-1, units)  # [fan_in, units]
  by_unit = np.where(np.isnan(by_unit), -np.inf, by_unit)
  # A stable sort of the negated scores down each column: equal scores keep index order.
  rows = np.argsort(-by_unit, axis=0, kind='stable')[:k]
  chosen = np.zeros(by_unit.shape, bool)
  chosen[rows, np.arange(units)[None, :]] = True
  return chosen.reshape(scores.shape)


@registry.register
class Gps(Selector):
  name = 'gps'
  params = (Param('k'), Param('num_batches', None), Param('train_head', True))
  summary = (
    'the `k` incoming weights of each output unit with the largest |mean gradient| over '
    "`num_batches` training batches, and their layers' biases"
  )
  paper = 'Zhang et al., CVPR 2024'
  per_element = True
  scores = 'gradient'

  def select(self, call: Call, ctx: Context) -> dict[str, Any]:
    k = positive_int(call, 'k')
    num_batches = optional_batches(call)
    head = ctx.head_if(call)
    # The candidates: every backbone kernel (a leaf with a fan-in and a unit axis); their
    # biases train whole, as in the paper's code.
    kernels = kernel_biases(ctx, ctx.backbone)
    biases = [b for b in kernels.values() if b is not None]
    levels = {p: TRAINED if p in head or p in biases else FROZEN for p in ctx.paths}
    if ctx.params is None:  # shapes only: any entry of a kernel may be chosen
      ctx.pending = True
      return {**levels, **dict.fromkeys(kernels, TRAINED)}
    grads = ctx.scores('gradient', num_batches, call.name)
    # A kernel the score pass left out (-inf, `Context.scores`) is outside what the plan can
    # train: its choice is intersected away, so any k entries will do.
    magnitude = {p: np.abs(np.asarray(grads[p], np.float32)) for p in kernels}
    chosen = {p: per_unit_top_k(g, k) for p, g in magnitude.items()}
    return {**levels, **levels_of(chosen)}
