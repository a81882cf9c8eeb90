"""Checkpoints: save and resume a run, and start a run from another one's parameters.

This module moves pytrees; it knows nothing of models, policies or the loop. On disk a
checkpoint directory holds one sub-directory per step, written by an Orbax
`CheckpointManager` with its default step names:

  directory/<step>/state/   the saved pytree (Orbax PyTree format, OCDBT)
  directory/<step>/meta/    a JSON dict (plan, config, step, ...)
  directory/<step>/commit_success.txt, _CHECKPOINT_METADATA   written by Orbax

A step is written into `directory/<step>.orbax-checkpoint-tmp*/`, which gets the commit
marker `commit_success.txt` and is then renamed to `directory/<step>/` (on GCS, where
rename is not atomic, Orbax writes `<step>/` in place and the marker last). A process
killed mid-save therefore leaves a tmp directory (on GCS: a step without the marker),
never a complete-looking half step; `latest_step` ignores both and the next `save`
deletes such leftovers.

Two kinds of checkpoint share the layout, so `load_params` reads either:
- train checkpoints (`save`): the whole train state, whose top level has `params`
  (and `batch_stats`, `opt_state`, `step`);
- variables checkpoints (`save_variables`): a model's `{'params': ..., 'batch_stats':
  ...}`, e.g. ported pretrained weights, at step 0.

Restored arrays are host numpy arrays, whatever devices and sharding they were saved
from: the caller places them (e.g. `Spread.replicate`), so a run resumes on any number
of devices. All processes call every function here together; Orbax lets only the
primary process write shared files (the JSON meta among them).

Parameters are named by their path joined with '/', e.g. `block1_conv1/kernel`; the
`dont_load` regexes of `load_params` match a whole path (`re.fullmatch`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from ftlab import paths
from ftlab.errors import InputError
from ftlab.files import storage

PyTree = Any
PathLike = str | os.PathLike


class MismatchError(InputError):
  """A checkpoint whose arrays do not fit what they are restored into.

  Attributes:
    path: the step directory read.
    expected: '/'-joined path -> shape of every leaf of the target (`dont_load` ones too).
    found: '/'-joined path -> shape of every leaf stored under the key read.
    skipped: paths a `dont_load` regex matched (not compared).
    unused_dont_load: `dont_load` regexes that match no path.
  """

  def __init__(
    self,
    message: str,
    path: Any,
    expected: dict,
    found: dict,
    skipped: Iterable[str] = (),
    unused_dont_load: Iterable[str] = (),
  ):
    super().__init__(message)
    self.path, self.expected, self.found = path, expected, found
    self.skipped, self.unused_dont_load = set(skipped), list(unused_dont_load)


class NonFiniteError(InputError):
  """Loaded arrays hold inf or NaN values.

  Attributes:
    path: the step directory read.
    counts: '/'-joined path -> what was found, e.g. '1 inf, 2 NaN'.
  """

  def __init__(self, message: str, path: Any, counts: dict[str, str]):
    super().__init__(message)
    self.path, self.counts = path, counts


LISTED = 6  # names listed in full in a mismatch message; longer lists are summarised
STATE = 'state'  # the Composite item holding the pytree
META = 'meta'  # the Composite item holding the JSON dict


def _registry() -> ocp.handlers.CheckpointHandlerRegistry:
  # PyTree (not Standard) args: the same on-disk format as StandardSave, but restore
  # can choose the restored type (numpy) and read a subtree (`partial_restore`).
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, handler, save_args, restore_args in [
    (STATE, ocp.PyTreeCheckpointHandler(), ocp.args.PyTreeSave, ocp.args.PyTreeRestore),
    (META, ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore),
  ]:
    registry.add(item, save_args, handler)
    registry.add(item, restore_args, handler)
  return registry


class StorageError(InputError):
  """A checkpoint that could not be written (disk full, permissions, a file too large) or
  that cannot be read back where it was written; the steps saved before are intact."""


# Characters TensorStore (Orbax's array store) writes into a local path but cannot open again:
# `[`/`]` (read as a glob by its file driver) and `\` (a separator to it). Seen with Orbax
# 0.12.8: the save succeeds and every restore fails with NOT_FOUND.
UNREADABLE = ('[', ']', '\\')


def check_directory(directory: PathLike, what: str = 'checkpoint directory') -> None:
  """Raises StorageError, in one line, for a local checkpoint directory whose path Orbax
  writes but cannot read back (`UNREADABLE`): found before a run writes anything, not at its
  next launch."""
  value = os.fspath(directory)
  bad = [c for c in UNREADABLE if c in value] if not storage.scheme(value) else []
  if bad:
    raise StorageError(
      f'{what} {value!r} holds {" and ".join(map(repr, bad))}: Orbax writes checkpoints there '
      'but cannot read them back; choose a path without [ ] \\'
    )


def _path(directory: PathLike) -> epath.Path:
  # Orbax's tensorstore writer rejects relative local paths; URLs (gs://) stay as they are.
  return storage.path(directory, 'checkpoint directory')


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_registry()))


# --- Which steps exist. ------------------------------------------------------------------------


def all_steps(directory: PathLike) -> list[int]:
  """The complete checkpoints in `directory`, oldest first ([] if there is none).

  A step counts when Orbax considers it finalized (locally: its directory is not an
  `.orbax-checkpoint-tmp*` one) and it holds Orbax's commit marker, which Orbax >= 0.12
  writes into every step just before the final rename. The second test also drops a
  step directory left incomplete by a copy, a filesystem without atomic rename, or a
  hand deletion; it would also drop a local checkpoint of an older Orbax that wrote
  the marker only on GCS.
  """
  directory = _path(directory)
  if not directory.is_dir():
    return []
  marker = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
  found = ocp.path.step.standard_name_format().find_all(directory)
  return sorted(m.step for m in found if (m.path / marker).exists())


def latest_step(directory: PathLike) -> int | None:
  """The newest complete step in `directory`, or None (see `all_steps`)."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


def _step_dir(directory: PathLike, step: int | None) -> epath.Path:
  directory = _path(directory)
  steps = all_steps(directory)
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {directory}')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(
      f'no complete checkpoint for step {step} in {directory}; complete steps: {steps}'
    )
  return directory / str(step)


# --- Saving. -----------------------------------------------------------------------------------


def save(
  directory: PathLike,
  step: int,
  state: PyTree,
  meta: Mapping[str, Any],
  *,
  max_to_keep: int | None = 3,
) -> epath.Path:
  """Writes `state` and `meta` as checkpoint `directory/<step>`, synchronously.

  When this returns the checkpoint is complete on disk: a process killed at any time
  leaves either the whole new step or none of it. Only then are the oldest steps
  beyond `max_to_keep` deleted, so the previous checkpoint survives a failed save.
  Leftover tmp directories of earlier, interrupted saves are removed first.

  Args:
    directory: the checkpoint directory (created if missing).
    step: the step number; newer than every complete step in `directory`.
    state: a pytree of arrays (numpy, or jax arrays of any sharding, e.g. a
      replicated `NamedSharding`; unreplicate `pmap`-stacked arrays first). Empty
      nodes (`optax.MaskedNode()`, `optax.EmptyState()`) are fine: they take no space
      and come back from the restore target.
    meta: a JSON-serialisable dict (plan, config as a dict, ...); saved with `step`
      added.
    max_to_keep: how many of the newest steps to keep, at least 2, or None for all.

  Returns:
    The path of the new step directory.

  Raises:
    ValueError: `step` is not newer than the latest step, an incomplete directory has
      its name, or `max_to_keep` < 2.
    TypeError: `meta` is not JSON-serialisable.
  """
  # Two at least: a resume whose newest step is damaged falls back to the one before it
  # (`ftlab.run._resume`), which must still exist.
  if max_to_keep is not None and max_to_keep < 2:
    raise ValueError(f'max_to_keep={max_to_keep}: keep at least 2 checkpoints (or None for all)')
  directory, step = _path(directory), int(step)
  # Checked before Orbax starts writing, so a bad meta never leaves a half-written step.
  meta = _json_dict(meta, step)
  latest = latest_step(directory)
  # A step at or behind the newest one means two runs share the directory or a run did not
  # resume from it; either way, writing would leave the newest step not the run's state.
  if latest is not None and step <= latest:
    raise ValueError(
      f'checkpoint step {step} is not newer than step {latest} already in {directory}; '
      'resume from it (restore) or use a fresh directory'
    )
  if (directory / str(step)).exists() and storage.scheme(directory) != 'gs':
    # Not deleted here: a checkpoint of an Orbax version without the marker looks alike. On
    # GCS every Orbax version wrote the marker, so a step without one is a save cut short,
    # which the manager's tmp cleanup below deletes.
    raise ValueError(
      f'{directory / str(step)} exists but is not a complete checkpoint (no '
      f'{ocp.path.atomicity_types.COMMIT_SUCCESS_FILE}); move it away to save step {step}'
    )
  options = ocp.CheckpointManagerOptions(
    # Synchronous, so that `save` returning means the step is on disk.
    enable_async_checkpointing=False,
    # Old steps go only after the new one is committed (see the docstring), so a crash during
    # a save never leaves fewer complete checkpoints than before.
    preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
    cleanup_tmp_directories=True,
  )
  args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(meta)})
  # A manager per save, closed at once: nothing Orbax holds (threads, open handles) outlives
  # the call, and a later `save` sees the directory as it is on disk.
  try:
    with ocp.CheckpointManager(directory, options=options, handler_registry=_registry()) as mngr:
      # `force`: the caller decides when to save, not Orbax's save-interval policy.
      mngr.save(step, args=args, force=True)
  except (OSError, ValueError) as e:
    reason = storage_failure(e)
    if reason is None:  # not the storage's doing: a programming error keeps its traceback
      raise
    kept = f'step {latest} is intact' if latest is not None else 'no earlier step was saved'
    raise StorageError(
      f'checkpoint step {step} could not be written to {directory} ({reason}); {kept}: fix the '
      'storage and run the same command to resume'
    ) from None
  verify_readable(directory, step)
  return directory / str(step)


# How storage failures read in what Orbax and TensorStore raise (TensorStore's status codes and
# the OS error behind them): disk full, quota, a file too large, no permission, read-only.
_STORAGE_FAILURES = (
  'RESOURCE_EXHAUSTED',
  'PERMISSION_DENIED',
  'No space left',
  'Disk quota exceeded',
  'File too large',
  'Permission denied',
  'Read-only file system',
)


def storage_failure(error: BaseException) -> str | None:
  """The storage's reason for `error` in one line (`No space left on device`), or None when
  the error is not a failure of the storage."""
  text = str(error)
  if isinstance(error, OSError) and error.errno is not None:
    return os.strerror(error.errno)
  if not any(mark in text for mark in _STORAGE_FAILURES):
    return None
  # The OS's words where TensorStore passes them on, else its status code.
  return next(
    (r for r in _OS_REASONS if r in text), next(m for m in _STORAGE_FAILURES if m in text)
  )


_OS_REASONS = (
  'No space left on device',
  'Disk quota exceeded',
  'File too large',
  'Permission denied',
  'Read-only file system',
)


def verify_readable(directory: PathLike, step: int) -> None:
  """Reads back the meta and the smallest array of a step just written: a checkpoint that
  cannot be read where it was written (`check_directory` knows the paths seen) is found now,
  not at the next launch.

  Raises:
    StorageError: naming the step, the directory and what failed.
  """
  path = _step_dir(directory, step)
  try:
    restore_meta(directory, step)
    with _checkpointer() as ckptr:
      saved = ckptr.metadata(path).item_metadata[STATE].tree
    flat = ocp.tree.to_flat_dict(saved, sep='/')
    if flat:
      # One array, the smallest, read for real; every other leaf a placeholder, not read.
      smallest = min(flat, key=lambda p: (int(np.prod(flat[p].shape)), p))
      item = jax.tree_util.tree_map_with_path(
        lambda kp, m: (
          np.zeros(m.shape, m.dtype) if paths.from_key_path(kp) == smallest else ocp.PLACEHOLDER
        ),
        saved,
      )
      restore_args = jax.tree.map(
        lambda x: x if x is ocp.PLACEHOLDER else ocp.RestoreArgs(restore_type=np.ndarray), item
      )
      _restore_items(path, **{STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)})
  except (OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise StorageError(
      f'checkpoint step {step} was written to {directory} but cannot be read back ({first}); '
      'use another directory'
    ) from None


def save_variables(
  directory: PathLike, variables: Mapping[str, PyTree], meta: Mapping[str, Any]
) -> epath.Path:
  """Writes model variables (`{'params': ..., 'batch_stats': ...}`) as step 0 of
  `directory`, for `load_params`; e.g. a weight porter's output.

  Raises:
    ValueError: `directory` already holds a checkpoint.
  """
  return save(directory, 0, dict(variables), meta)


def _json_dict(meta: Mapping[str, Any], step: int) -> dict:
  meta = {**meta, 'step': step}
  try:
    json.dumps(meta)
  except TypeError as e:
    raise TypeError(f'checkpoint meta must be JSON-serialisable: {e}') from None
  return meta


# --- Reading. ----------------------------------------------------------------------------------


def restore_meta(directory: PathLike, step: int | None = None) -> dict:
  """The JSON meta of the latest (or given) complete step, without reading arrays.

  Raises:
    FileNotFoundError: no such complete step.
  """
  return _restore_items(_step_dir(directory, step), **{META: ocp.args.JsonRestore()})[META]


def _restore_items(path: epath.Path, **items: ocp.args.CheckpointArgs) -> Any:
  with _checkpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.Composite(**items))


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return tuple(x.shape), np.dtype(x.dtype)
  return np.shape(x), np.asarray(x).dtype


def _describe(shape: tuple[int, ...], dtype: np.dtype | None = None) -> str:
  return f'{shape}' if dtype is None else f'{shape} {dtype}'


def _stored(path: epath.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """'/'-joined path -> (shape, dtype) of every array in the step's state."""
  with _checkpointer() as ckptr:
    # Metadata only: shapes and dtypes come without reading any array, so a mismatch is found in
    # milliseconds even for a checkpoint of gigabytes.
    tree = ckptr.metadata(path).item_metadata[STATE].tree
  return {
    p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in ocp.tree.to_flat_dict(tree, sep='/').items()
  }


def _differences(expected: Mapping[str, str], found: Mapping[str, str], label: str) -> list[str]:
  """The 'missing', 'unexpected' and '{label}' clauses of a mismatch message; the
  values are leaf descriptions compared as strings. A long clause is summarised: its
  count, the name prefixes its paths share, and the first few."""
  missing = [p for p in expected if p not in found]
  unexpected = [p for p in found if p not in expected]
  mismatch = [p for p, d in expected.items() if p in found and found[p] != d]
  clauses = []
  for what, names, describe in [
    ('missing', missing, lambda p: f'{p} (expected {expected[p]})'),
    ('unexpected', unexpected, lambda p: f'{p} {found[p]}'),
    (label, mismatch, lambda p: f'{p} expected {expected[p]} found {found[p]}'),
  ]:
    if not names:
      continue
    shared = paths.common_prefix(names)
    shared = f' under {shared}*' if shared and len(names) > LISTED else ''
    clauses.append(f'{what} ({len(names)}{shared}): {paths.listing([describe(p) for p in names])}')
  return clauses


def stored_shapes(
  directory: PathLike, step: int | None = None, key: str = 'params'
) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every array under `key` in a step, read from its metadata
  (no array is read).

  Raises:
    FileNotFoundError: no such complete step.
  """
  prefix = f'{key}/'
  stored = _stored(_step_dir(directory, step))
  return {p[len(prefix) :]: shape for p, (shape, _) in stored.items() if p.startswith(prefix)}


def stored_dtypes(
  directory: PathLike, step: int | None = None, key: str = 'params'
) -> dict[str, np.dtype]:
  """'/'-joined path -> dtype of every array under `key` in a step (as `stored_shapes`).

  Raises:
    FileNotFoundError: no such complete step.
  """
  prefix = f'{key}/'
  stored = _stored(_step_dir(directory, step))
  return {p[len(prefix) :]: dtype for p, (_, dtype) in stored.items() if p.startswith(prefix)}


def _map(fn, tree: PyTree) -> PyTree:
  # Over array leaves only; empty nodes (MaskedNode, EmptyState) keep their place.
  flat = ocp.tree.to_flat_dict(tree)
  return ocp.tree.from_flat_dict({k: fn(v) for k, v in flat.items()}, target=tree)


def restore(directory: PathLike, target: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
  """Resumes: the state of the latest (or given) complete step, and its meta.

  Args:
    directory: the checkpoint directory.
    target: the state's structure: a pytree of `jax.ShapeDtypeStruct`
      (`jax.eval_shape` of the state's initialiser) or of arrays, with the same
      pytree classes (a `TrainState`, optax states, `MaskedNode`s) as the saved one.
      Only structure, shapes and dtypes are read from it.
    step: the step to restore; None for the latest complete one.

  Returns:
    `(state, meta)`: `state` has the structure of `target` with numpy arrays as
    leaves (on the host; place them on devices yourself), `meta` is the saved dict.

  Raises:
    FileNotFoundError: no such complete step.
    ValueError: the saved state differs from `target` in paths, shapes or dtypes;
      the message lists every difference.
  """
  path = _step_dir(directory, step)
  expected = {
    p: _describe(*_shape_dtype(x)) for p, x in ocp.tree.to_flat_dict(target, sep='/').items()
  }
  stored = _stored(path)
  found = {p: _describe(*s) for p, s in stored.items()}
  # Compared before reading: a mismatch is one line listing every difference, instead of an
  # error from deep inside TensorStore about the first array it tripped on.
  problems = _differences(expected, found, 'mismatch')
  if problems:
    raise MismatchError(
      f'checkpoint {path} does not match the restore target: {"; ".join(problems)}. '
      'Was it written for another model or optimizer? To start a new run or stage from its '
      'parameters, use load_params',
      path,
      {p: _shape_dtype(x)[0] for p, x in ocp.tree.to_flat_dict(target, sep='/').items()},
      {p: shape for p, (shape, _) in stored.items()},
    )
  # A part of the target with no arrays that the saved state lacks altogether (a field added
  # to the train state since the checkpoint was written, as `ema`, empty unless asked for) is
  # left out of the restore and comes back from the target: an older checkpoint resumes.
  absent = _absent_empty_fields(path, target)
  item = target
  if absent:
    absl_logging.warning('checkpoint %s predates the fields %s; they start empty', path, absent)
    item = {k: v for k, v in _fields(target).items() if k not in absent}
  # Restoring as numpy ignores the saved sharding, so any device layout can resume.
  restore_args = _map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = _restore_items(
    path,
    **{
      STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
      META: ocp.args.JsonRestore(),
    },
  )
  state = restored[STATE]
  if absent:
    state = target.replace(**state) if hasattr(target, 'replace') else {**target, **state}
  return state, restored[META]


def _fields(tree: Any) -> dict[str, Any]:
  """The top-level parts of a dict or a dataclass pytree (a `TrainState`), by name."""
  if dataclasses.is_dataclass(tree):
    return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
  return dict(tree) if isinstance(tree, Mapping) else {}


def _absent_empty_fields(path: epath.Path, target: Any) -> list[str]:
  """Top-level parts of `target` that hold no arrays and that the step's saved tree lacks."""
  with _checkpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata[STATE].tree
  names = set(saved) if isinstance(saved, Mapping) else set()
  return [k for k, v in _fields(target).items() if k not in names and not jax.tree.leaves(v)]


def load_params(
  checkpoint_dir: PathLike,
  expected: PyTree,
  *,
  dont_load: Iterable[str] = (),
  key: str = 'params',
  step: int | None = None,
  allow_nonfinite: bool = False,
) -> PyTree:
  """Initialises from another checkpoint: its `key` subtree, strictly checked.

  Reads only that subtree (e.g. `params` of a train checkpoint, without its optimizer
  state, which the new plan rebuilds), from a `save` or `save_variables` checkpoint.

  Every path of `expected` must be in the checkpoint with the same shape, and the
  checkpoint may hold no other path, except paths fully matching a `dont_load` regex:
  those keep their `expected` (freshly initialised) value and may be missing from the
  checkpoint or differ there (e.g. a new head); stored ones are not read.

  Args:
    checkpoint_dir: a checkpoint directory (of step sub-directories).
    expected: the new model's freshly initialised subtree (arrays).
    dont_load: regexes of '/'-joined paths (`predictions/.*`) not to load.
    key: the top-level entry to read: `params`, or `batch_stats`.
    step: the step to read; None for the latest complete one.
    allow_nonfinite: load inf and NaN values instead of refusing them.

  Returns:
    A pytree with the structure of `expected`: loaded leaves are numpy arrays cast to
    the expected dtype; `dont_load` leaves are the `expected` leaves themselves.

  Raises:
    FileNotFoundError: no such complete step.
    MismatchError: a path is missing, unexpected or of another shape, or a `dont_load`
      regex matches no path; one error lists every problem.
    NonFiniteError: a loaded leaf holds inf or NaN (a weight file saved after a float16
      overflow), unless `allow_nonfinite`; the error names each leaf and its counts.
    ValueError: a `dont_load` regex is invalid.
  """
  path = _step_dir(checkpoint_dir, step)
  prefix = f'{key}/'
  stored = {p[len(prefix) :]: s for p, s in _stored(path).items() if p.startswith(prefix)}
  flat_expected = ocp.tree.to_flat_dict(expected, sep='/')
  # The union of both sides, in order: a `dont_load` rule may name a path only the checkpoint
  # has (an old head under another name) as well as one only the model has.
  candidates = list(dict.fromkeys([*flat_expected, *stored]))
  # Unused rules are not raised alone: they join the other problems in one error below.
  matches = paths.match_rules(candidates, list(dont_load), 'dont_load', allow_unused=True)
  skip, unused = {p for p, found in matches.items() if found}, paths.unused(matches, dont_load)
  # Dtypes are not compared: loaded values are cast to the model's dtype (a float16 port
  # into a float32 model), while a shape mismatch is always an error.
  want = {p: _shape_dtype(x) for p, x in flat_expected.items() if p not in skip}
  problems = _differences(
    {p: _describe(shape) for p, (shape, _) in want.items()},
    {p: _describe(shape) for p, (shape, _) in stored.items() if p not in skip},
    'shape mismatch',
  )
  if unused:
    problems.append(f'dont_load regexes matching no path: {", ".join(map(repr, unused))}')
  if problems:
    raise MismatchError(
      f'checkpoint {path} does not match the model ({key}): {"; ".join(problems)}',
      path,
      {p: _shape_dtype(x)[0] for p, x in flat_expected.items()},
      {p: shape for p, (shape, _) in stored.items()},
      skipped=skip,
      unused_dont_load=unused,
    )
  loaded = {}
  if want:
    # Only the wanted leaves, as nested dicts under `key`: Orbax's partial restore
    # reads these and nothing else (not the optimizer state, not skipped leaves).
    item = ocp.tree.from_flat_dict(
      {f'{prefix}{p}': jax.ShapeDtypeStruct(*sd) for p, sd in want.items()}, sep='/'
    )
    restore_args = _map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = _restore_items(path, **{STATE: args})[STATE]
    loaded = ocp.tree.to_flat_dict(restored[key], sep='/')
    # Checked here, once, on the host: a NaN in the loaded weights would otherwise surface as a
    # non-finite loss at step 1 with no hint of its source.
    bad = {} if allow_nonfinite else paths.nonfinite_counts(loaded)
    if bad:
      raise NonFiniteError(
        f'checkpoint {path} holds non-finite values ({key}) in {len(bad)} array(s): '
        f'{paths.listing([f"{p} ({c})" for p, c in bad.items()])}',
        path,
        bad,
      )
  flat = {p: loaded[p] if p in want else x for p, x in flat_expected.items()}
  return ocp.tree.from_flat_dict(flat, target=expected, sep='/')


def load_tree(directory: PathLike, step: int | None = None) -> PyTree:
  """The whole state of the latest (or given) complete step as it was stored, with numpy
  leaves and no target: nested dicts and lists (a tuple of optimizer states comes back as a
  list), for readers that want what is there (a run's masks in its optimizer state).

  Raises:
    FileNotFoundError: no such complete step.
  """
  path = _step_dir(directory, step)
  with _checkpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata[STATE].tree
  restore_args = _map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return _restore_items(path, **{STATE: ocp.args.PyTreeRestore(restore_args=restore_args)})[STATE]


def quiet_orbax_logs() -> None:
  """Drops Orbax's INFO chatter (dozens of lines per save) from absl's log; keeps warnings."""

  def keep(record: logging.LogRecord) -> bool:
    # By source file, not by logger name: Orbax logs through absl's logger, which ftlab's own
    # messages share.
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname

  absl_logging.get_absl_handler().addFilter(keep)
