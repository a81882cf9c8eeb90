"""Tuners: reparameterisations of frozen kernels, folded back into plain VGG parameters.

A tuner (LoRA and the methods beside it) is a selector that adds *adapter* leaves next to the
kernels it adapts (`block4_conv1/lora_a` beside `block4_conv1/kernel`) and says how to fold a
layer's leaves into the plain ones (`Tuner.fold`), exactly and traceably. The adapters train;
the kernels they adapt stay frozen bit for bit. Everything here is generic over tuners:

  attach     adds a tuner's adapters to the layers a plan trains (drawn from the run's key)
  fold       the plain parameters of an adapted tree (the one fold point of the steps:
             `ftlab.train.model_variables`); `merge` does it on the host
  counts     adapter parameters per layer, for the audit table and `trainable_parameters`

The tuner is found by the adapter leaves' names, so a tree (or a checkpoint) says how to fold
itself: export, soups, WiSE-FT, evaluation and the activation cache see a plain VGG.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Mapping

import jax
import numpy as np

from ftlab import paths
from ftlab.plans import registry
from ftlab.plans.registry import Call, PlanError
from ftlab.plans.selection import Context, whole

PyTree = Any


class Tuner(registry.Selector):
  """A reparameterisation of selected kernels (conv `[k, k, Cin, Cout]`, dense `[in, out]`).

  Attributes:
    title: its name in messages and the audit table (`LoRA`).
    leaves: the adapter leaves it adds beside a kernel, in the order `adapters` returns them.
    constants: `{leaf: what it is}` of adapter leaves that never train (LoRA's alpha).
  """

  kind: ClassVar[str] = 'tuner'
  title: ClassVar[str] = ''
  leaves: ClassVar[tuple[str, ...]] = ()
  constants: ClassVar[Mapping[str, str]] = {}

  def check(self, call: Call) -> None:
    """Checks the call's arguments, before anything is computed.

    Raises:
      PlanError: naming the bad value.
    """

  def adapts(self, shape: tuple[int, ...]) -> bool:
    """Whether a kernel of this shape can be adapted (conv and dense kernels)."""
    return len(shape) in (2, 4)

  def adapters(self, call: Call, kernel: Any, key: jax.Array) -> dict[str, Any]:
    """`{leaf: array}` for one kernel, chosen so that the folded kernel is the kernel itself
    (step 0 is the loaded model); `key` draws any random factor. Traceable: `attach` plans on
    shapes by `jax.eval_shape` of this function."""
    raise NotImplementedError

  def fold(self, layer: Mapping[str, Any]) -> dict[str, Any]:
    """The plain leaves (`kernel`, `bias`, ...) of one layer given all its leaves, adapters
    included; pure and traceable (gradients reach the adapters through it)."""
    raise NotImplementedError

  def describe(self, layers: Mapping[str, Mapping[str, Any]]) -> str:
    """One line for the audit table, given `{layer: {leaf: value}}` of the adapted layers
    (constants such as a stored alpha are not counted: they never train)."""
    count = sum(
      int(np.prod(np.shape(v)))
      for leaves in layers.values()
      for leaf, v in leaves.items()
      if leaf in self.trained
    )
    return (
      f'{self.title}: {count:,} adapter parameters on {len(layers)} frozen kernels, '
      'folded into them for export, soups and evaluation (tuners.merge)'
    )

  @property
  def trained(self) -> tuple[str, ...]:
    """The adapter leaves that train."""
    return tuple(leaf for leaf in self.leaves if leaf not in self.constants)

  def select(self, call: Call, ctx: Context) -> dict[str, int]:
    """The tuner's set: every adapter leaf it trains, plus the head (unless
    `train_head=False`).

    Raises:
      PlanError: bad arguments, or a tree without its adapters (`attach` adds them).
    """
    self.check(call)
    # The adapters themselves are the set; the kernels they adapt stay frozen unless another
    # term trains them, which `trained_layers` refuses.
    found = {p for p in ctx.paths if paths.leaf_of(p) in self.trained}
    if not found:
      raise PlanError(
        f'policy {self.name}: the parameters hold no adapters (tuners.attach adds them)'
      )
    return whole(ctx, found | ctx.head_if(call))


def rank_and_alpha(call: Call, default_alpha: float) -> tuple[int, float]:
  """The checked `rank` and `alpha` of a low-rank tuner's call (LoRA, DoRA, LoHa, LoKr: the
  update is scaled by alpha / rank).

  Raises:
    PlanError: a rank that is not a positive integer or an alpha that is not a positive number.
  """
  rank, alpha = call.get('rank'), call.get('alpha', default_alpha)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise PlanError(
      f'policy {call.name}: rank={rank!r} is not a positive integer (e.g. {call.name}(8))'
    )
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < np.inf:
    raise PlanError(f'policy {call.name}: alpha={alpha!r} is not a positive number (e.g. alpha=16)')
  return rank, float(alpha)


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> jax.Array:
  """U(+-1/sqrt(fan_in)) of `shape`: torch's `kaiming_uniform_(a=sqrt(5))`, which peft uses for
  the adapter factors that do not start at zero (fan_in as torch counts it for the factor's
  own torch layout, given by the caller)."""
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_order(kernel: Any) -> Any:
  """A kernel as the `[D, Cout]` matrix whose rows are in torch's `(Cin, kh, kw)` order: conv
  `[k, k, Cin, Cout]` -> `[Cin * k * k, Cout]`, dense `[in, out]` as it is. The methods whose
  result depends on how a conv kernel's input axes are grouped (OFT's blocks) use this order,
  so that their blocks are peft's."""
  if kernel.ndim == 2:
    return kernel
  k1, k2, cin, cout = kernel.shape
  return kernel.transpose(2, 0, 1, 3).reshape(cin * k1 * k2, cout)


def from_torch_order(matrix: Any, shape: tuple[int, ...]) -> Any:
  """The inverse of `torch_order`: the `[D, Cout]` matrix back to a kernel of `shape`."""
  if len(shape) == 2:
    return matrix
  k1, k2, cin, cout = shape
  return matrix.reshape(cin, k1, k2, cout).transpose(1, 2, 0, 3)


def all_tuners() -> dict[str, Tuner]:
  return {n: m for n, m in registry.of_kind('tuner').items() if isinstance(m, Tuner)}


def _by_leaf() -> dict[str, Tuner]:
  # Recomputed on each call, not cached: a test may register or remove a tuner at any time.
  return {leaf: t for t in all_tuners().values() for leaf in t.leaves}


def is_adapter(path: str) -> bool:
  """Whether '/'-joined `path` is an adapter leaf of some tuner."""
  return paths.leaf_of(path) in _by_leaf()


def find(expressions: Iterable[Any]) -> tuple[Tuner, Call] | None:
  """The tuner term of a plan's stage expressions (`Stage.expression`), or None."""
  tuners = all_tuners()
  # A set, because a schedule's stages repeat the same tuner call; `syntax` allows one tuner
  # term per plan, so at most one distinct call is found.
  calls = {c for e in expressions for c in e.calls() if c.name in tuners}
  if not calls:
    return None
  call = min(calls, key=str)  # one tuner per plan (the parser), but never by set order
  return tuners[call.name], call


def adaptable_layers(params: PyTree, structure: Any, tuner: Tuner) -> list[str]:
  """Layers outside the head whose kernel `tuner` adapts, in sorted order."""
  head = set(structure.head.layers)
  return [
    paths.layer_of(p)
    for p, x in paths.flatten(params).items()
    # Top-level `layer/kernel` leaves only: an adapter's own leaves are never adapted again.
    if p.count(paths.SEP) == 1 and paths.leaf_of(p) == 'kernel' and tuner.adapts(np.shape(x))
    if paths.layer_of(p) not in head
  ]


def attach(
  params: PyTree, layers: Iterable[str], tuner: Tuner, call: Call, rng: jax.Array | None = None
) -> PyTree:
  """`params` with `tuner`'s adapters next to the kernel of each of `layers`.

  Args:
    params: plain parameters (arrays, or `jax.ShapeDtypeStruct`s to plan on shapes).
    layers: the layers to adapt (`adaptable_layers`, or those a plan trains: `adapted`).
    tuner: the tuner; `call` its term in the plan.
    call: the tuner's call (its arguments).
    rng: the run's init key; layer i of the sorted `layers` draws from
      `fold_in(fold_in(rng, 1), i)` (stream 1: the model's init uses `rng` itself); None
      with shapes only.

  Returns:
    The tree with the adapter leaves added.
  """
  tuner.check(call)
  flat = paths.flatten(params)
  # Sorted, so layer i draws the same key whatever order the plan listed the layers in.
  for i, layer in enumerate(sorted(layers)):
    kernel = flat[paths.join(layer, 'kernel')]
    if rng is None or isinstance(kernel, jax.ShapeDtypeStruct):
      # Shapes only: the adapters' shapes and dtypes, traced, nothing drawn or computed.
      new = jax.eval_shape(lambda k: tuner.adapters(call, k, jax.random.key(0)), kernel)
    else:
      new = tuner.adapters(call, kernel, jax.random.fold_in(jax.random.fold_in(rng, 1), i))
    for leaf, value in new.items():
      flat[paths.join(layer, leaf)] = value
  return paths.unflatten(flat)


def plan_shapes(params: PyTree, structure: Any, stages: Iterable[Any]) -> PyTree:
  """Parameter shapes to plan a run's stages (`policies.Stage`) on: with adapters at every
  adaptable kernel when a stage trains a tuner, else `params` as they are."""
  found = find(s.expression for s in stages)
  if not found:
    return params
  tuner, call = found
  # Every adaptable kernel gets adapters for planning, so any stage's set expression can name
  # any of them; only the layers some stage actually trains are attached for the run
  # (`adapted`).
  return attach(params, adaptable_layers(params, structure, tuner), tuner, call)


def adapted(stages: Iterable[Any], plans: Iterable[Any]) -> tuple:
  """`(layers, tuner, call)` of the adapters a run creates (`trained_layers` of its stages'
  `plans`, made on `plan_shapes`), or () for a run without a tuner.

  Raises:
    PlanError: as `trained_layers`.
  """
  found = find(s.expression for s in stages)
  if not found:
    return ()
  tuner, call = found
  return trained_layers(plans), tuner, call


def trained_layers(plans: Iterable[Any]) -> list[str]:
  """The layers whose adapters some plan trains (plans made on a tree with every adapter).

  Raises:
    PlanError: a plan that trains a kernel together with its adapter (`lora(4) | full`),
      only some of a layer's adapter leaves, or a constant adapter leaf.
  """
  by_leaf, layers = _by_leaf(), set()
  for plan in plans:
    mask = plan.flat_mask()
    for path, trains in mask.items():
      tuner = by_leaf.get(paths.leaf_of(path))
      if tuner is None or not trains:
        continue
      layer, leaf, where = paths.layer_of(path), paths.leaf_of(path), f'plan {plan.name!r}'
      if leaf in tuner.constants:
        raise PlanError(
          f'{where} trains {path}, {tuner.constants[leaf]}; select adapters with {tuner.name}()'
        )
      # A kernel trained beside its own adapter would be updated twice over (directly and through
      # the fold), and the adapter would no longer be a pure low-rank delta of the loaded kernel.
      if mask[paths.join(layer, 'kernel')]:
        raise PlanError(
          f'{where} trains {layer}/kernel and its {tuner.title} adapter; combine '
          f'{tuner.name}(...) with a set that freezes the kernels it adapts (& blocks, '
          '& last_blocks, & first_blocks, & regex, | bitfit, | linear_probe)'
        )
      if not all(mask[paths.join(layer, other)] for other in tuner.trained):
        raise PlanError(
          f'{where} trains some of {layer}/{", ".join(tuner.trained)} only: train all or none'
        )
      layers.add(layer)
  return sorted(layers)


def _adapted_layers(flat: Mapping[str, Any]) -> dict[str, Tuner]:
  by_leaf = _by_leaf()
  return {
    paths.layer_of(p): by_leaf[paths.leaf_of(p)]
    for p in flat
    if paths.leaf_of(p) in by_leaf and p.count(paths.SEP) == 1
  }


def fold(params: PyTree) -> PyTree:
  """The plain parameters: each adapted layer's leaves folded by its tuner, adapters dropped;
  a tree without adapters is returned as it is. Pure and traceable: the steps apply it to the
  parameters they differentiate, so gradients reach the adapters through it."""
  flat = paths.flatten(params)
  adapted_layers = _adapted_layers(flat)
  # A plain tree is returned as it came, not rebuilt from `flat`: callers outside a trace
  # keep their own tree and arrays.
  if not adapted_layers:
    return params
  for layer, tuner in adapted_layers.items():
    prefix = layer + paths.SEP
    # Popped, so the adapters vanish from the folded tree and the model sees a plain VGG layer.
    leaves = {paths.leaf_of(p): flat.pop(p) for p in list(flat) if p.startswith(prefix)}
    for leaf, value in tuner.fold(leaves).items():
      flat[paths.join(layer, leaf)] = value
  return paths.unflatten(flat)


def merge(params: PyTree) -> PyTree:
  """`fold` on the host: plain numpy parameters of a tuned model (for export, soups, WiSE-FT,
  evaluation). Its logits equal the adapted model's up to float rounding."""
  if not _adapted_layers(paths.flatten(params)):
    return params
  # Through `jit`, like the step: the merged kernels are computed by the same XLA program as
  # the ones the training evaluated.
  return jax.device_get(jax.jit(fold)(params))


def counts(params: PyTree) -> dict[str, int]:
  """`{layer: trained adapter parameters}` of the adapted layers (LoRA: r (k k Cin + Cout)
  for a conv, r (in + out) for a dense kernel)."""
  out, by_leaf = {}, _by_leaf()
  for p, x in paths.flatten(params).items():
    tuner = by_leaf.get(paths.leaf_of(p))
    if tuner is not None and paths.leaf_of(p) in tuner.trained:
      out[paths.layer_of(p)] = out.get(paths.layer_of(p), 0) + int(np.prod(np.shape(x)))
  return out


def describe(params: PyTree) -> str:
  """The audit table's line for each tuner with adapters in `params` ('' for none)."""
  flat = paths.flatten(params)
  found: dict[str, dict[str, dict[str, Any]]] = {}
  for layer, tuner in _adapted_layers(flat).items():
    prefix = layer + paths.SEP
    leaves = {paths.leaf_of(p): v for p, v in flat.items() if p.startswith(prefix)}
    found.setdefault(tuner.name, {})[layer] = {k: leaves[k] for k in tuner.leaves if k in leaves}
  tuners = all_tuners()
  return '\n'.join(tuners[name].describe(layers) for name, layers in found.items())
