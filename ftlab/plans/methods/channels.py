"""Structured masks: whole output filters (conv) or units (dense) of the backbone train.

`channels(density, score='magnitude', num_batches=None, train_head=True)` ranks every output
unit of every backbone kernel (the last axis: a conv filter of `[kh, kw, Cin, Cout]`, a dense
unit of `[in, out]`) by the *mean* of its kernel slice's per-entry scores, and trains the
`round(density * F)` best of the backbone's F units: every entry of a chosen unit's kernel
slice and its bias entry. The mean, not the sum, so that units of layers with a wide fan-in
(3x3x512 inputs against 3x3x64) do not win by size alone; the bias is left out of the score
(its scale is not a weight's). Ties go to the lower index (kernels in path order, then units).

Per-entry scores (`score`): `magnitude` |w| of the loaded weights, `fisher` the mean squared
per-example gradient (`fisher`), `snip` |w * mean gradient| (`snip`). BatchNorm leaves stay
frozen (add `| bitfit` for their shifts).

The masks are per-entry levels like every element selector's, so reports, masked deltas and
the moving average need nothing new.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftlab.plans import registry
from ftlab.plans.methods.snip import snip_scores
from ftlab.plans.registry import Call, Param, Selector
from ftlab.plans.selection import (
  FROZEN,
  TRAINED,
  Context,
  fraction,
  kernel_biases,
  levels_of,
  one_of,
  optional_batches,
  top_count,
  value,
)

SCORES = {'magnitude': '', 'fisher': 'fisher', 'snip': 'gradient'}  # score -> its pass


def check_score(call: Call) -> str:
  """`score` of a channels call, one of `SCORES`.

  Raises:
    PlanError: naming the value.
  """
  return one_of(call, 'score', 'magnitude', SCORES)


@registry.register
class Channels(Selector):
  name = 'channels'
  params = (
    Param('density'),
    Param('score', 'magnitude'),
    Param('num_batches', None),
    Param('train_head', True),
  )
  summary = (
    "whole output filters/units: the share `density` of the backbone's units by the mean "
    "per-entry `score` ('magnitude', 'fisher' or 'snip') of their kernel slice, with biases"
  )
  paper = 'filter ranking as in Li et al., ICLR 2017'
  per_element = True

  def scores_needed(self, call: Call) -> str:
    return SCORES.get(value(call, 'score', 'magnitude'), '')

  def select(self, call: Call, ctx: Context) -> dict[str, Any]:
    share = fraction(call, 'density')
    score = check_score(call)
    num_batches = optional_batches(call)
    head = ctx.head_if(call)
    kernels = kernel_biases(ctx, ctx.backbone)
    candidates = list(kernels) + [b for b in kernels.values() if b is not None]
    levels = {p: TRAINED if p in head else FROZEN for p in ctx.paths}
    if ctx.params is None:  # shapes only: any unit may be chosen
      ctx.pending = True
      return {**levels, **dict.fromkeys(candidates, TRAINED)}
    if score == 'magnitude':
      entries = {p: np.abs(np.asarray(ctx.params[p], np.float32)) for p in kernels}
    elif score == 'fisher':
      found = ctx.scores('fisher', num_batches, call.name)
      entries = {p: np.asarray(found[p], np.float32) for p in kernels}
    else:
      entries = snip_scores(ctx, list(kernels), num_batches, call.name)
    # One score per unit: the mean over the kernel slice (every axis but the last).
    per_unit = {p: s.reshape(-1, s.shape[-1]).mean(axis=0) for p, s in entries.items()}
    n_units = sum(s.size for s in per_unit.values())
    chosen = top_count(per_unit, int(round(share * n_units)))
    mask = {}
    for kernel, bias in kernels.items():
      mask[kernel] = np.broadcast_to(chosen[kernel], ctx.shapes[kernel])
      if bias is not None:
        mask[bias] = chosen[kernel]
    return {**levels, **levels_of(mask)}
