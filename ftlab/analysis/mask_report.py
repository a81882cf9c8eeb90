"""Masks you can explain: what a run trained, layer by layer, and how masks of runs overlap.

`read_run(RUN)` reads a finished run back: its initial parameters (rebuilt through the very
function the run used, `ftlab.run.initial_variables`: the loaded checkpoint, the fresh head
from the run's seed, a tuner's adapters; checked against the frozen leaves of the final
checkpoint bit for bit), its final parameters (a tuned run's folded into plain kernels) and
the entries its plan trains (per-element masks read from the checkpoint's optimizer state by
`ftlab.plans.optim`'s readers; a dynamic mask's current one). `layer_report` turns these
into per-layer figures and `jaccard_matrix` compares the chosen entries of several runs.
Everything returns data; `scripts/mask_report.py` writes `mask_report.json`, the plots and
the sweep's tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from ftlab import init_from, paths, run
from ftlab.files import checkpoint, workdir
from ftlab.plans import optim, policies, tuners


class RunError(workdir.RunError):
  """A directory that is not a finished ftlab run, or one that cannot be read back, in one
  line."""


@dataclasses.dataclass
class RunWeights:
  """A run's parameters before and after training, and what its plan trains.

  Attributes:
    name: the run's directory name.
    directory: the run's directory.
    step: the step of the checkpoint read.
    plan: the plan's name, as the checkpoint records it.
    initial: `{path: array}`, the parameters the run started from (a tuner's adapters
      folded into plain parameters, as export sees them).
    final: `{path: array}`, the parameters of the checkpoint (folded likewise).
    trained: `{path: bool array}`, the entries the plan trains at `step` (whole leaves for
      leaf-level plans; for a tuner, every entry of the kernels it adapts and of the leaves
      it trains beside them).
    head: the paths of the head (a new head trains whole in every plan).
    unfolded: `(initial, final)` as the run holds them, a tuner's adapter factors as their
      own leaves (the same as `initial`, `final` for a run without adapters).
  """

  name: str
  directory: str
  step: int
  plan: str
  initial: dict[str, np.ndarray]
  final: dict[str, np.ndarray]
  trained: dict[str, np.ndarray]
  head: tuple[str, ...]
  unfolded: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None


def _read_config(directory: str) -> tuple[dict, ml_collections.ConfigDict]:
  try:
    found = workdir.read_run(directory)
  except (FileNotFoundError, workdir.RunError) as e:
    raise RunError(
      f'{directory} is not a finished ftlab run (a run directory with checkpoints/): '
      f'{str(e).splitlines()[0]}'
    ) from None
  return found, ml_collections.ConfigDict(found['config'])


def _stored_opt_state(ckpt_dir: str, step: int) -> Any:
  """The checkpoint's optimizer state, restored without a target (nested dicts)."""
  return checkpoint.load_tree(ckpt_dir, step)['opt_state']


def _leaves_with_state(opt_state, initial, final, mask) -> dict[str, bool]:
  """Which leaves a per-element plan trains, read from the optimizer state: a leaf without
  entry levels trains whole if it has optimizer moments, else it is frozen; with a stateless
  optimizer (SGD without momentum), if it changed."""
  stateful = optim.moment_paths(opt_state)
  if stateful:
    return {p: mask[p] and p in stateful for p in mask}
  return {p: mask[p] and _digest(initial[p]) != _digest(final[p]) for p in mask}


def read_run(directory: str, step: int | None = None) -> RunWeights:
  """A finished run's initial and final parameters and its trained entries.

  The initial parameters are rebuilt as the run built them (`ftlab.run.initial_variables`:
  the loaded checkpoint, the fresh head from the run's seed, a tuner's adapters) and checked
  against the frozen leaves of the checkpoint bit for bit. A tuned run is read folded: its
  kernels are the adapted ones, and the kernels its adapters change count as trained.

  Args:
    directory: the run's workdir (with `checkpoints/`).
    step: the checkpoint to read; None for the newest.

  Returns:
    The run's `RunWeights`.

  Raises:
    RunError: no complete checkpoint or config, or initial weights that do not reproduce
      the run's frozen leaves (its init checkpoint changed since it ran).
  """
  found, config = _read_config(directory)
  ckpt_dir, step = found['directory'], step if step is not None else found['step']
  shapes = checkpoint.stored_shapes(ckpt_dir, step)
  if 'predictions/kernel' not in shapes:
    raise RunError(f'{directory}: its checkpoint has no predictions/kernel (not a VGG run)')
  num_classes = int(shapes['predictions/kernel'][-1])
  try:
    model, stages, adapted = run.check_plans(config, num_classes)
    variables = run.initial_variables(config, model, adapted)
  except init_from.InitError as e:
    raise RunError(f'{directory}: its initial weights cannot be rebuilt: {e}') from None
  structure = model.block_structure()
  # The stage that took step `step` (with `step - 1` done) wrote this checkpoint; its plan is
  # the one whose masks the optimizer state holds.
  stage = policies.stage_at(stages, max(step - 1, 0))
  # On shapes: no score pass is run to rebuild a mask; per-element masks are read from the
  # checkpoint's optimizer state instead, where the run kept them.
  shaped = policies.make_plan(
    jax.eval_shape(lambda: variables['params']), structure, config.policy, stage=stage
  )
  raw_initial = paths.flatten(variables['params'])
  # `checkpoint.load_params`, not `init_from`'s: the frozen check below compares the stored
  # leaves as they are, adapters unfolded.
  raw_final = paths.flatten(checkpoint.load_params(ckpt_dir, variables['params'], step=step))
  # Leaves the plan freezes (on shapes: whatever masks are chosen) never move.
  frozen = [p for p, t in shaped.flat_mask().items() if not t]
  moved = [p for p in frozen if _digest(raw_initial[p]) != _digest(raw_final[p])]
  if moved:
    raise RunError(
      f"{directory}: the rebuilt initial weights differ from the run's frozen leaves "
      f'({paths.listing(moved)}): its init checkpoint ({config.init.checkpoint}) changed'
    )
  opt_state = _stored_opt_state(ckpt_dir, step)
  levels = optim.entry_levels(opt_state)
  mask = shaped.flat_mask()
  initial = {p: np.asarray(x) for p, x in paths.flatten(tuners.merge(variables['params'])).items()}
  final = {
    p: np.asarray(x) for p, x in paths.flatten(tuners.merge(paths.unflatten(raw_final))).items()
  }
  if shaped.masks_pending:  # which leaves a per-element plan trains whole or not at all
    mask = _leaves_with_state(opt_state, initial, final, mask)
  # A tuner trains what its adapters change: the kernels of the layers it adapts.
  adapted = {paths.layer_of(p) for p, t in mask.items() if t and tuners.is_adapter(p)}
  kernels = {p for p in initial if paths.layer_of(p) in adapted and paths.leaf_of(p) == 'kernel'}

  def entries(p: str, x: np.ndarray) -> np.ndarray:
    if p in levels:  # Child-Tuning_F's RESAMPLED entries train too (with probability p)
      return np.asarray(levels[p]) != policies.FROZEN
    return np.full(x.shape, bool(mask.get(p, False)) or p in kernels)

  trained = {p: entries(p, x) for p, x in initial.items()}
  head = tuple(p for p in initial if paths.layer_of(p) in structure.head.layers)
  meta_plan = found['plan'] or str(config.policy.name)
  unfolded = (
    {p: np.asarray(x) for p, x in raw_initial.items()},
    {p: np.asarray(x) for p, x in raw_final.items()},
  )
  return RunWeights(
    workdir.run_name(directory),
    directory,
    int(step),
    meta_plan,
    initial,
    final,
    trained,
    head,
    unfolded,
  )


def _digest(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def _bits_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Entry by entry, whether two arrays of one dtype differ in any bit (-0.0 vs 0.0 too)."""
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
  return a.view(view) != b.view(view)


def layer_report(
  initial: Mapping[str, np.ndarray],
  final: Mapping[str, np.ndarray],
  trained: Mapping[str, np.ndarray],
) -> dict:
  """Per layer (the first part of a path: `block4_conv1` holds its kernel and bias): its
  entries, the entries the mask trains and the share of the run's trainable budget they are,
  the entries that changed, and the norm of the change against the initial norm.

  Args:
    initial: `{path: array}` before training.
    final: `{path: array}` after, the same paths and shapes.
    trained: `{path: bool array}` of the entries the plan trains.

  Returns:
    `{'layers': [{'layer', 'entries', 'trained', 'trained_fraction', 'budget_share',
    'changed', 'changed_fraction', 'delta_norm', 'initial_norm', 'relative_delta'}, ...],
    'total': {the same over every layer}}`, layers in the parameters' order; norms are
    float64 2-norms over the layer's leaves together (`relative_delta` is NaN for a layer
    that starts at zero).
  """
  rows: dict[str, dict] = {}
  for p, x0 in initial.items():
    layer = paths.layer_of(p)
    row = rows.setdefault(layer, dict(entries=0, trained=0, changed=0, delta_sq=0.0, init_sq=0.0))
    x0, x1 = np.asarray(x0), np.asarray(final[p])
    # float64: a small update to a large weight would otherwise round away in the difference.
    delta = x1.astype(np.float64) - x0.astype(np.float64)
    row['entries'] += x0.size
    row['trained'] += int(np.count_nonzero(trained[p]))
    # By bits, so an entry that moved and came back exactly counts as unchanged, and -0.0 vs
    # 0.0 as changed.
    row['changed'] += int(np.count_nonzero(_bits_differ(x0, x1)))
    row['delta_sq'] += float(np.sum(delta * delta))
    row['init_sq'] += float(np.sum(np.square(x0.astype(np.float64))))
  budget = sum(r['trained'] for r in rows.values())

  def finish(name, r):
    delta, init = float(np.sqrt(r['delta_sq'])), float(np.sqrt(r['init_sq']))
    return dict(
      layer=name,
      entries=r['entries'],
      trained=r['trained'],
      trained_fraction=r['trained'] / r['entries'],
      budget_share=r['trained'] / budget if budget else 0.0,
      changed=r['changed'],
      changed_fraction=r['changed'] / r['entries'],
      delta_norm=delta,
      initial_norm=init,
      relative_delta=delta / init if init else float('nan'),
    )

  layers = [finish(name, r) for name, r in rows.items()]
  totals = {k: sum(r[k] for r in rows.values()) for k in ('entries', 'trained', 'changed')}
  totals.update(
    delta_sq=sum(r['delta_sq'] for r in rows.values()),
    init_sq=sum(r['init_sq'] for r in rows.values()),
  )
  return {'layers': layers, 'total': finish('total', totals)}


def run_report(weights: RunWeights) -> dict:
  """`layer_report` of a read run, with its name, plan and step (`mask_report.json`)."""
  return {
    'run': weights.name,
    'plan': weights.plan,
    'step': weights.step,
    **layer_report(weights.initial, weights.final, weights.trained),
  }


def chosen(weights: RunWeights) -> dict[str, np.ndarray]:
  """The backbone entries a run's plan trains (the head, which every plan trains, left out)."""
  return {p: t for p, t in weights.trained.items() if p not in weights.head}


def jaccard(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
  """|a ∩ b| / |a ∪ b| of two `{path: bool array}` entry sets over the same paths (1.0 for
  two empty sets).

  Raises:
    ValueError: the two sets are over different paths or shapes.
  """
  if set(a) != set(b) or any(np.shape(a[p]) != np.shape(b[p]) for p in a):
    raise ValueError('jaccard: the two masks cover different parameters (another model?)')
  both = sum(int(np.count_nonzero(a[p] & b[p])) for p in a)
  either = sum(int(np.count_nonzero(a[p] | b[p])) for p in a)
  # Two empty sets are the same set.
  return both / either if either else 1.0


def jaccard_matrix(masks: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray:
  """The symmetric matrix of `jaccard` between every two of `masks` (in their order)."""
  names = list(masks)
  out = np.eye(len(names))
  for i in range(len(names)):
    for j in range(i + 1, len(names)):
      out[i, j] = out[j, i] = jaccard(masks[names[i]], masks[names[j]])
  return out
