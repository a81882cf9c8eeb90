"""A per-element mask the user supplies: `indices(path, train_head=True)`.

`path` is a local `.npz` archive (`np.savez`) whose keys are parameter paths, '/'-joined as
in the audit table (`block4_conv1/kernel`), each holding either

- a boolean array of the parameter's shape (True: trained), or
- a 1-D integer array of flat indices into the parameter (row-major, as `np.ravel`; repeats
  are allowed).

Parameters the archive does not name stay frozen, except the head, which trains whole unless
`train_head=False`. The file is read with `np.load` (no pickles) each time a plan is made,
including the shape-only check at launch (`run.check_plans`), so a bad file is a one-line
error before any data is read into a step; `plans/` reads no storage layer, so the path is a
local one (no `gs://`).
"""

from __future__ import annotations

import difflib
import os
import zipfile
from typing import Any

import numpy as np

from ftlab.plans import registry
from ftlab.plans.registry import Call, Param, PlanError, Selector
from ftlab.plans.selection import FROZEN, TRAINED, Context, value


def read_masks(call: Call, ctx: Context) -> dict[str, np.ndarray]:
  """`{path: bool array of the parameter's shape}` of the archive `call` names, checked
  against the model's shapes (`ctx.shapes`).

  Raises:
    PlanError: naming the file and its first bad entry (keys sorted): an unreadable file,
      an unknown parameter (with the closest known one), a wrong shape, an index out of
      range or a dtype that is neither bool nor integer.
  """
  path = value(call, 'path', None)
  if not isinstance(path, str) or not path:
    raise PlanError(f'policy {call.name}: path={path!r} is not a path to an .npz file')
  where = f'policy {call.name}: {path!r}'
  try:
    # Narrow: np.load raises OSError for a missing file, BadZipFile for a damaged archive and
    # ValueError for anything it would need a pickle to read.
    archive = np.load(os.path.expanduser(path), allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise PlanError(f'{where} cannot be read as an .npz file: {e}') from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise PlanError(f'{where} is a single array, not an .npz archive keyed by parameter path')
  masks = {}
  with archive:
    for key in sorted(archive.files):
      if key not in ctx.shapes:
        close = difflib.get_close_matches(key, ctx.paths, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f' ({len(ctx.paths)} parameters)'
        raise PlanError(f"{where} names unknown parameter '{key}'{hint}")
      try:
        found = archive[key]
      except ValueError as e:  # an object array (it would need a pickle)
        raise PlanError(f"{where}: '{key}' cannot be read: {e}") from None
      masks[key] = _mask(where, key, found, ctx.shapes[key])
  return masks


def _mask(where: str, key: str, found: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The boolean mask `found` encodes for a parameter of `shape` (the module's two forms)."""
  if found.dtype == np.bool_:
    if found.shape != tuple(shape):
      raise PlanError(
        f"{where}: '{key}' is a bool mask of shape {found.shape}, but the parameter's shape is "
        f'{tuple(shape)}'
      )
    return found
  if np.issubdtype(found.dtype, np.integer):
    size = int(np.prod(shape))
    if found.ndim != 1:
      raise PlanError(
        f"{where}: '{key}' holds integers of shape {found.shape}; flat indices are 1-D"
      )
    bad = found[(found < 0) | (found >= size)]
    if bad.size:
      raise PlanError(
        f"{where}: '{key}' has index {int(bad[0])} out of range [0, {size}) for shape "
        f'{tuple(shape)}'
      )
    mask = np.zeros(size, bool)
    mask[found] = True
    return mask.reshape(shape)
  raise PlanError(
    f"{where}: '{key}' has dtype {found.dtype}; expected bool (the parameter's shape) or "
    'integer flat indices'
  )


@registry.register
class Indices(Selector):
  name = 'indices'
  params = (Param('path'), Param('train_head', True))
  summary = (
    'the entries a user-supplied .npz names: per parameter path a bool mask of its shape or '
    '1-D flat indices'
  )
  per_element = True

  def select(self, call: Call, ctx: Context) -> dict[str, Any]:
    # Shapes are enough: the mask is the file's, so it is checked (and exact) before any
    # weights load.
    masks = read_masks(call, ctx)
    head = ctx.head_if(call)
    levels: dict[str, Any] = {p: TRAINED if p in head else FROZEN for p in ctx.paths}
    for p, m in masks.items():
      if p not in head:
        levels[p] = (m * TRAINED).astype(np.uint8)
    return levels
