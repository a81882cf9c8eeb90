"""What selectors share: entry levels, the selection context, and choosing the top entries.

A selector (`ftlab.plans.registry.Selector`) maps `(call, ctx)` to `{path: level}`, where a
level is FROZEN, RESAMPLED (Child-Tuning_F: kept with probability p each step) or TRAINED, a
scalar for a whole leaf or a uint8 array per entry. The levels are ordered so that the union
of two sets is their maximum and the intersection their minimum (`ftlab.plans.policies`).

Per-element selectors choose a share of the *backbone* (every parameter outside the head)
and train the head whole unless `train_head=False`; `top_fraction` and `top_count` choose
exactly `round(density * n)` or `count` entries. `top_count` (and its jnp twin, which dynamic
masks use) gives ties to the lower flat index; `top_fraction` breaks them in
`np.argpartition`'s order, the same for the same scores, but not by index.

How a density is shared among the leaves (`allocate`, an element selector's `alloc`):

- `global`: one ranking over every leaf together; a leaf with large scores may get more than
  its share (FISH and the magnitude baselines as published).
- `uniform`: every leaf gets `round(density * n_leaf)` of its own entries (so the total may
  differ from `round(density * n)` by the leaves' roundings).
- `erk`: Erdős–Rényi-kernel (Evci et al., ICML 2020, RigL; jaxpruner's `erk`): leaf l's density
  is `eps * sum(shape_l) / prod(shape_l)`, eps chosen so that the counts add up to
  `density * n`; a leaf whose density would pass 1 is dense and eps is found again without it.
  Counts are rounded by largest remainder, so they add up to exactly `round(density * n)`.

A "layer" of `uniform` and `erk` is a leaf: a kernel and its bias are shared out separately.
A bias (C,) has the ERK factor C / C = 1, far above any kernel's, so `erk` makes biases dense
first, as RigL leaves biases dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Mapping

import numpy as np

from ftlab import paths as paths_
from ftlab.models.vgg import BlockStructure
from ftlab.plans.registry import REQUIRED, Call, PlanError, Selector

# Entry levels of a trainable set, ordered so that union is max and intersection is min.
FROZEN, RESAMPLED, TRAINED = 0, 1, 2

ScoresFn = Callable[[str, int | None], Mapping[str, np.ndarray]]


@dataclasses.dataclass
class Context:
  """What a selector reads while a plan is made, and what it reports back.

  Attributes:
    paths: every parameter path, sorted.
    structure: the model's blocks.
    params: `{path: value}`, or None when the plan is made from shapes (then per-element
      selectors cannot choose yet: they mark every candidate entry and set `pending`).
    shapes: `{path: shape}` (from values or shapes).
    scores_fn: `(kind, num_batches) -> {path: array}`, the run's score passes (`fisher`: mean
      squared per-example gradient; `gradient`: mean gradient), or None.
    pending: set by a selector that needs values to choose.
    resample_p: set by Child-Tuning_F: RESAMPLED entries are kept with this probability.
    dynamic: set by a dynamic mask: how it changes (`ftlab.plans.dynamic_masks.DynamicMask`).
  """

  paths: list[str]
  structure: BlockStructure
  params: dict[str, Any] | None
  shapes: dict[str, tuple[int, ...]]
  scores_fn: ScoresFn | None = None
  pending: bool = False
  resample_p: float | None = None
  dynamic: Any = None

  def layers(self, blocks: Iterable[Any]) -> set[str]:
    """The paths of every layer of `blocks` (`vgg.Block`s)."""
    layers = {layer for block in blocks for layer in block.layers}
    return {p for p in self.paths if paths_.layer_of(p) in layers}

  @property
  def head(self) -> set[str]:
    """The paths of the head (the layers a transfer task replaces)."""
    return self.layers([self.structure.head])

  @property
  def backbone(self) -> list[str]:
    """Every path outside the head, sorted."""
    head = self.head
    return [p for p in self.paths if p not in head]

  def head_if(self, call: Call) -> set[str]:
    """The head's paths unless the call says `train_head=False`."""
    return self.head if value(call, 'train_head', True) else set()

  def scores(self, kind: str, num_batches: int | None, who: str) -> dict[str, np.ndarray]:
    """The run's `kind` scores over `num_batches` training batches (None: every example), for
    every path: -inf for a leaf the score pass did not differentiate (one the plan cannot
    train, such as a leaf outside `blocks(...)` in `fisher(0.01) & blocks([4, 5])`).

    Raises:
      PlanError: the plan is made without a score pass (`who` asked for one).
    """
    # Plans made on shapes (`run.check_plans`) never read scores: their per-element selectors
    # stop at `pending` before asking.
    if self.scores_fn is None:
      raise PlanError(f'policy {who} needs gradients of the training data (a {kind} pass)')
    found = self.scores_fn(kind, num_batches)
    # The pass differentiates only the leaves the plan can train (`run.make_run`'s scorer
    # scope): under `&` or `-` fewer than the backbone a selector ranks. The others score -inf,
    # so they rank last and are never chosen (before, `fisher(0.01) & blocks([4, 5])` failed
    # with a KeyError on the first unscored leaf).
    return {
      p: np.asarray(found[p]) if p in found else np.full(self.shapes[p], -np.inf, np.float32)
      for p in self.paths
    }


def value(call: Call, key: str, default: Any = None) -> Any:
  """An argument of `call`, `default` where it is absent or None."""
  found = call.get(key, None)
  return default if found is None else found


def whole(ctx: Context, trainable: Iterable[str]) -> dict[str, int]:
  """Levels of a leaf-level selection: TRAINED for `trainable` paths, FROZEN elsewhere."""
  chosen = set(trainable)
  return {p: TRAINED if p in chosen else FROZEN for p in ctx.paths}


def fraction(call: Call, key: str) -> float:
  """The argument `key` of `call`, checked to be a fraction in (0, 1].

  Raises:
    PlanError: naming the value.
  """
  found = value(call, key, None)
  # `bool` is an `int` in Python; `True` would otherwise pass as a density of 1.
  if isinstance(found, bool) or not isinstance(found, (int, float)) or not 0 < found <= 1:
    raise PlanError(f'policy {call.name}: {key}={found!r} is not a fraction in (0, 1]')
  return float(found)


def positive_int(call: Call, key: str, default: Any = REQUIRED) -> int:
  """The argument `key` of `call` (or `default`), checked to be a positive int.

  Raises:
    PlanError: naming the value.
  """
  found = value(call, key, None if default is REQUIRED else default)
  if isinstance(found, bool) or not isinstance(found, int) or found < 1:
    raise PlanError(f'policy {call.name}: {key}={found!r} is not a positive int')
  return found


def one_of(call: Call, key: str, default: str, valid: Iterable[str]) -> str:
  """The argument `key` of `call` (or `default`), checked to be one of `valid`.

  Raises:
    PlanError: naming the value and the valid ones.
  """
  found = value(call, key, default)
  if found not in valid:
    raise PlanError(f'policy {call.name}: {key}={found!r}; valid: {", ".join(valid)}')
  return found


def optional_batches(call: Call) -> int | None:
  """`num_batches` of a score pass: a positive int, or None for every training example.

  Raises:
    PlanError: naming the value.
  """
  found = value(call, 'num_batches', None)
  return None if found is None else positive_int(call, 'num_batches')


def int_seed(call: Call) -> int:
  """`seed` of `call` (default 0), checked to be an int.

  Raises:
    PlanError: naming the value.
  """
  seed = value(call, 'seed', 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise PlanError(f'policy {call.name}: seed={seed!r} is not an int')
  return seed


def blocks_scope(ctx: Context, call: Call) -> list[str]:
  """The backbone paths a dynamic or per-element selection chooses among: those of the blocks
  `call` names (`blocks=[4, 5]`), or the whole backbone.

  Raises:
    PlanError: an empty or unknown block list.
  """
  requested = value(call, 'blocks', None)
  if requested is None:
    return ctx.backbone
  by_name = {b.name: b for b in ctx.structure.blocks}
  names = [f'block{b}' if isinstance(b, int) else str(b) for b in list(requested)]
  unknown = [n for n in names if n not in by_name]
  if not names or unknown:
    raise PlanError(f'policy {call.name}: blocks={requested!r}; valid: {list(by_name)}')
  chosen = ctx.layers(by_name[n] for n in names)
  return [p for p in ctx.backbone if p in chosen]


def kernel_biases(ctx: Context, paths: list[str]) -> dict[str, str | None]:
  """`{kernel path: its layer's bias path or None}` of the kernels among `paths`: leaves with
  a fan-in and a unit axis (the last: a conv filter of `[kh, kw, Cin, Cout]`, a dense unit of
  `[in, out]`); a bias is the layer's one-dimensional leaf of shape `(units,)` among `paths`."""
  by_layer: dict[str, list[str]] = {}
  for p in paths:
    by_layer.setdefault(paths_.layer_of(p), []).append(p)
  found = {}
  for p in paths:
    shape = ctx.shapes[p]
    if len(shape) < 2:
      continue
    # The layer's leaf with one value per unit (`bias` in every VGG layer).
    same = [q for q in by_layer[paths_.layer_of(p)] if ctx.shapes[q] == shape[-1:]]
    found[p] = same[0] if same else None
  return found


def top_fraction(scores: Mapping[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
  """Boolean masks choosing exactly round(density * n) entries with the largest scores,
  over all the given leaves together."""
  # One ranking over all leaves together: the density is a share of the whole backbone, so a
  # layer with large scores may get more than its share of entries.
  n = sum(np.size(s) for s in scores.values())
  return top_k(scores, int(round(density * n)))


def top_k(scores: Mapping[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
  """Boolean masks choosing exactly `k` entries with the largest scores over all the given
  leaves together, tied entries in `np.argpartition`'s order (`top_fraction`)."""
  flat = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores.values()])
  chosen = np.zeros(flat.size, bool)
  if k:
    # `argpartition` finds the top k in linear time without sorting; which of tied entries it
    # takes is deterministic but not by index (unlike `top_count`).
    chosen[np.argpartition(-flat, k - 1)[:k]] = True
  return _unflat(chosen, scores)


def top_count(scores: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
  """Boolean masks choosing exactly `count` entries with the largest scores over all the
  leaves together (in the mapping's order); ties go to the lower flat index, NaN ranks last.
  The numpy twin of `ftlab.plans.dynamic_masks.top_count` (the tests hold them equal)."""
  flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores.values()])
  # NaN ranks last, as in `dynamic_masks.top`: float32 and a stable sort, so the first mask
  # and every later one break ties the same way.
  flat = np.where(np.isnan(flat), -np.inf, flat)
  chosen = np.zeros(flat.size, bool)
  chosen[np.argsort(-flat, kind='stable')[:count]] = True
  return _unflat(chosen, scores)


ALLOCS = ('global', 'uniform', 'erk')


def check_alloc(call: Call) -> str:
  """`alloc` of `call` (default `global`), one of `ALLOCS`.

  Raises:
    PlanError: naming the value.
  """
  return one_of(call, 'alloc', 'global', ALLOCS)


def erk_counts(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, int]:
  """Entries per leaf under Erdős–Rényi-kernel densities (RigL, Evci et al., ICML 2020).

  Args:
    shapes: `{path: shape}` of the leaves sharing the density.
    density: the share of all their entries, in (0, 1].

  Returns:
    `{path: count}`, each at most the leaf's size, adding up to `round(density * n)`.
  """
  sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
  # ERK's raw density of a leaf: (sum of its dims) / (product of its dims); a leaf with one
  # entry per dimension (a scalar) counts as 1.
  raw = {p: (sum(s) / sizes[p] if len(s) else 1.0) if sizes[p] else 0.0 for p, s in shapes.items()}
  target = density * sum(sizes.values())
  dense: set[str] = set()
  # RigL's loop: give eps to the sparse leaves; while the densest would pass 1, make it dense
  # and find eps again for the rest (each pass makes at least one more leaf dense).
  while True:
    rest = [p for p in sizes if p not in dense and raw[p] > 0]
    left = target - sum(sizes[p] for p in dense)
    if not rest or left <= 0:
      eps = 0.0
      break
    eps = left / sum(raw[p] * sizes[p] for p in rest)
    top = max(raw[p] for p in rest)
    if eps * top <= 1:
      break
    dense |= {p for p in rest if raw[p] == top}
  exact = {p: float(sizes[p]) if p in dense else eps * raw[p] * sizes[p] for p in sizes}
  counts = {p: min(int(np.floor(x)), sizes[p]) for p, x in exact.items()}
  # Largest remainder: the counts add up to exactly round(density * n); remainders tie to
  # the earlier leaf (the mapping's order).
  short = int(round(density * sum(sizes.values()))) - sum(counts.values())
  order = sorted(sizes, key=lambda p: -(exact[p] - counts[p]))
  for p in [p for p in order if counts[p] < sizes[p]][: max(short, 0)]:
    counts[p] += 1
  return counts


def allocate(scores: Mapping[str, np.ndarray], density: float, alloc: str) -> dict[str, np.ndarray]:
  """Boolean masks choosing a share `density` of the leaves' entries by score, shared among
  the leaves as `alloc` says (`global`, `uniform`, `erk`: the module's docstring).

  Args:
    scores: `{path: float array}` of the candidate leaves (larger: chosen first).
    density: the share, in (0, 1].
    alloc: one of `ALLOCS`.

  Returns:
    `{path: bool array}` of the scores' shapes.
  """
  if alloc == 'global':
    return top_fraction(scores, density)
  if alloc == 'uniform':
    return {p: top_fraction({p: s}, density)[p] for p, s in scores.items()}
  if alloc == 'erk':
    counts = erk_counts({p: np.shape(s) for p, s in scores.items()}, density)
    return {p: top_k({p: s}, counts[p])[p] for p, s in scores.items()}
  raise ValueError(f'allocate: unknown alloc {alloc!r}')


def _unflat(chosen: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, offset = {}, 0
  for path, s in like.items():
    out[path] = chosen[offset : offset + np.size(s)].reshape(np.shape(s))
    offset += np.size(s)
  return out


def levels_of(mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """uint8 levels (TRAINED where chosen) of boolean masks."""
  return {p: (np.asarray(m) * TRAINED).astype(np.uint8) for p, m in mask.items()}


class ElementSelector(Selector):
  """A per-element selector from a scoring rule: the top `density` share of the backbone's
  entries by score, plus the whole head unless `train_head=False`.

  Subclasses give `entry_scores` (and `check` for arguments besides the density); `density`
  names the share's parameter (Child-Tuning_D calls it `p`). A subclass that declares
  `Param('alloc', 'global')` lets the plan say how the share is spread over the leaves
  (`allocate`); without it the share is global.
  """

  per_element: ClassVar[bool] = True
  density: ClassVar[str] = 'density'

  def check(self, call: Call) -> None:
    """Checks the arguments besides the density, before any weights or data are read.

    Raises:
      PlanError: naming the bad value.
    """

  def entry_scores(self, call: Call, ctx: Context, paths: list[str]) -> dict[str, np.ndarray]:
    """`{path: score per entry}` of the given backbone paths (larger: chosen first)."""
    raise NotImplementedError

  def select(self, call: Call, ctx: Context) -> dict[str, Any]:
    share = fraction(call, self.density)
    alloc = check_alloc(call)
    self.check(call)
    backbone, head = ctx.backbone, ctx.head_if(call)
    levels = {p: TRAINED if p in head else FROZEN for p in ctx.paths}
    # Every entry is marked trainable while pending, so the optimizer planned on shapes has
    # the structure (and the checks) of any mask the real weights could choose.
    if ctx.params is None:  # shapes only: any backbone entry may be chosen
      ctx.pending = True
      return {**levels, **dict.fromkeys(backbone, TRAINED)}
    scores = self.entry_scores(call, ctx, backbone)
    chosen = allocate({p: scores[p] for p in backbone}, share, alloc)
    return {**levels, **levels_of(chosen)}
