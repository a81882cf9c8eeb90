"""LoRA as a policy: low-rank updates of frozen conv and dense kernels (Hu et al., ICLR 2022).

`lora(rank, alpha=8, train_head=True)` in a plan expression trains, for each selected layer,
two adapter leaves next to its kernel while the kernel itself stays frozen bit for bit:

  conv   kernel [k, k, Cin, Cout]   lora_a [k, k, Cin, r]   lora_b [r, Cout]
  dense  kernel [in, out]           lora_a [in, r]          lora_b [r, out]
         lora_alpha []  (a constant: the scale is alpha / r; never trained)

A conv adapter is peft's `Conv2d` LoRA layer: a k x k convolution down to r channels (same
stride and padding as the kernel) followed by a 1 x 1 convolution up to Cout. Convolution is
linear, so the pair equals one convolution with the kernel `einsum('hwir,ro->hwio', A, B)`:
a rank-r update of the kernel read as the (k*k*Cin) x Cout matrix the convolution multiplies
image patches by, which is what "rank" means for a dense kernel too. `fold` adds
`alpha / r * A B` to each kernel and drops the adapters, so the model stays a plain VGG: it
runs wherever parameters meet `model.apply` (the steps of `ftlab.train`, the activation
cache's prefix, the few-shot features), and `merge` / `load_params` give plain parameters for
export, soups, WiSE-FT and `combine`. B starts at zero, so the first step's logits are the
loaded model's, bit for bit; A starts as peft's (Kaiming-uniform, a = sqrt(5): U(+-1/sqrt(fan_in))).

Which layers get adapters is the plan's choice: `lora(r)` adapts every kernel outside the head
(the new head trains whole unless `train_head=False`); `lora(r) & blocks([4, 5])` those of
blocks 4-5; `lora(r) | bitfit` adds the biases; `lp_ft(N) + lora(r)` probes, then trains the
adapters. The run plans on a tree with an adapter at every adaptable kernel and keeps only
those some stage trains (`trained_layers`, `attach`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import paths
from ftlab.files import checkpoint
from ftlab.plans import syntax
from ftlab.plans.syntax import PlanError

PyTree = Any
A, B, ALPHA = 'lora_a', 'lora_b', 'lora_alpha'
LEAVES = (A, B, ALPHA)
DEFAULT_ALPHA = 8.0  # peft's `lora_alpha` default
# Valid partners of lora(...) in a set expression (per-element masks are not: see policy_syntax).
COMBINES_WITH = ('blocks', 'last_blocks', 'first_blocks', 'regex', 'bitfit', 'linear_probe')


@dataclasses.dataclass(frozen=True)
class Spec:
  """A plan's LoRA term: rank r and alpha (the update is scaled by alpha / r)."""

  rank: int
  alpha: float


def is_adapter(path: str) -> bool:
  """Whether '/'-joined `path` is an adapter leaf (`lora_a`, `lora_b` or `lora_alpha`)."""
  return path.rsplit('/', 1)[-1] in LEAVES


def spec_of(call: syntax.Call) -> Spec:
  """The checked arguments of a `lora(...)` call.

  Raises:
    PlanError: a rank that is not a positive integer or an alpha that is not a positive number.
  """
  rank, alpha = call.get('rank'), call.get('alpha', DEFAULT_ALPHA)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise PlanError(f'policy lora: rank={rank!r} is not a positive integer (e.g. lora(8))')
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < np.inf:
    raise PlanError(f'policy lora: alpha={alpha!r} is not a positive number (e.g. alpha=16)')
  return Spec(rank, float(alpha))


def spec(expressions: Iterable[syntax.Expression]) -> Spec | None:
  """The LoRA term of a plan's stage expressions (`Stage.expression`), or None."""
  calls = {c for e in expressions for c in e.calls() if c.name == 'lora'}
  return spec_of(next(iter(calls))) if calls else None


def policy(paths_: list[str], structure: Any, cfg: Any) -> set[str]:
  """The `lora` set: every `lora_a` and `lora_b` leaf of the tree, plus the head.

  Raises:
    PlanError: bad arguments, or a tree without adapters (see `attach`).
  """
  spec_of(cfg)
  adapters = {p for p in paths_ if p.rsplit('/', 1)[-1] in (A, B)}
  if not adapters:
    raise PlanError('policy lora: the parameters hold no adapters (lora.attach adds them)')
  train_head = cfg.get('train_head', True)
  head = {p for p in paths_ if p.split('/')[0] in structure.head.layers}
  return adapters | (head if train_head in (None, True) else set())


def adaptable_layers(params: PyTree, structure: Any) -> list[str]:
  """Layers outside the head with a conv (`[k, k, Cin, Cout]`) or dense (`[in, out]`) kernel,
  in sorted order."""
  head = set(structure.head.layers)
  return [
    p.split('/')[0]
    for p, x in paths.flatten(params).items()
    if p.count('/') == 1 and p.endswith('/kernel') and np.ndim(x) in (2, 4)
    if p.split('/')[0] not in head
  ]


def attach(
  params: PyTree, layers: Iterable[str], lora_spec: Spec, rng: jax.Array | None = None
) -> PyTree:
  """`params` with an adapter next to the kernel of each of `layers`.

  Args:
    params: plain parameters (arrays, or `jax.ShapeDtypeStruct`s to plan on shapes).
    layers: the layers to adapt (`adaptable_layers` or `trained_layers`).
    lora_spec: rank and alpha.
    rng: the run's init key; layer i of the sorted `layers` draws its A from
      `fold_in(fold_in(rng, 1), i)` (stream 1: the model's init uses `rng` itself); None
      with shapes only.

  Returns:
    The tree with `<layer>/lora_a` (`[k, k, Cin, r]` or `[in, r]`, U(+-1/sqrt(fan_in)) as
    peft's `kaiming_uniform_(a=sqrt(5))`), `<layer>/lora_b` (`[r, Cout]`, zeros) and
    `<layer>/lora_alpha` (float32 scalar) in the kernel's dtype.
  """
  flat = paths.flatten(params)
  r = lora_spec.rank
  for i, layer in enumerate(sorted(layers)):
    kernel = flat[f'{layer}/kernel']
    shape_a, shape_b = (*kernel.shape[:-1], r), (r, kernel.shape[-1])
    if isinstance(kernel, jax.ShapeDtypeStruct) or rng is None:
      a, b = (
        jax.ShapeDtypeStruct(shape_a, kernel.dtype),
        jax.ShapeDtypeStruct(shape_b, kernel.dtype),
      )
      alpha = jax.ShapeDtypeStruct((), jnp.float32)
    else:
      bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))  # fan_in = k * k * Cin (or in)
      key = jax.random.fold_in(jax.random.fold_in(rng, 1), i)
      a = jax.random.uniform(key, shape_a, kernel.dtype, -bound, bound)
      b, alpha = jnp.zeros(shape_b, kernel.dtype), jnp.asarray(lora_spec.alpha, jnp.float32)
    flat.update({f'{layer}/{A}': a, f'{layer}/{B}': b, f'{layer}/{ALPHA}': alpha})
  return paths.unflatten(flat)


def plan_shapes(params: PyTree, structure: Any, stages: Iterable[Any]) -> PyTree:
  """Parameter shapes to plan a run's stages (`policies.Stage`) on: with an adapter at every
  adaptable kernel when a stage trains `lora(...)`, else `params` as they are."""
  found = spec(s.expression for s in stages)
  return attach(params, adaptable_layers(params, structure), found) if found else params


def adapters(stages: Iterable[Any], plans: Iterable[Any]) -> tuple:
  """`(layers, spec)` of the adapters a run creates (`trained_layers` of its stages' `plans`,
  made on `plan_shapes`), or () for a run without LoRA.

  Raises:
    PlanError: as `trained_layers`.
  """
  found = spec(s.expression for s in stages)
  return (trained_layers(plans), found) if found else ()


def trained_layers(plans: Iterable[Any]) -> list[str]:
  """The layers whose adapters some plan trains (plans made on a tree with every adapter).

  Raises:
    PlanError: a plan that trains a kernel together with its adapter (`lora(4) | full`),
      `lora_a` without `lora_b`, or the constant `lora_alpha`.
  """
  layers = set()
  for plan in plans:
    mask = plan.flat_mask()
    for path, trains in mask.items():
      layer, leaf = path.rsplit('/', 1)
      if leaf not in LEAVES or not trains:
        continue
      where = f'plan {plan.name!r}'
      if leaf == ALPHA:
        raise PlanError(
          f"{where} trains {path}, LoRA's constant scale; select adapters with lora()"
        )
      if mask[f'{layer}/kernel']:
        raise PlanError(
          f'{where} trains {layer}/kernel and its LoRA adapter; combine lora(...) with a set '
          f'that freezes the kernels it adapts: {", ".join(COMBINES_WITH)}'
        )
      if not mask[f'{layer}/{A}'] or not mask[f'{layer}/{B}']:
        raise PlanError(f'{where} trains one of {layer}/lora_a, lora_b: train both or neither')
      layers.add(layer)
  return sorted(layers)


def fold(params: PyTree) -> PyTree:
  """The plain parameters: each adapted kernel W becomes `W + alpha / r * A B` (A B over the
  rank axis: `einsum('...r,ro->...o')`), and the adapter leaves are dropped; a tree without
  adapters is returned as it is. Pure and traceable: the steps apply it to the parameters
  they differentiate, so gradients reach A and B through it.
  """
  flat = paths.flatten(params)
  adapted = [p[: -len(A) - 1] for p in flat if p.endswith(f'/{A}')]
  if not adapted:
    return params
  for layer in adapted:
    a, b, alpha = (flat.pop(f'{layer}/{leaf}') for leaf in LEAVES)
    kernel = flat[f'{layer}/kernel']
    delta = jnp.tensordot(a, b, axes=1) * (alpha / a.shape[-1])
    flat[f'{layer}/kernel'] = (kernel + delta.astype(kernel.dtype)).astype(kernel.dtype)
  return paths.unflatten(flat)


def merge(params: PyTree) -> PyTree:
  """`fold` on the host: plain numpy parameters of a LoRA-trained model (for export,
  soups, WiSE-FT, evaluation). Its logits equal the adapted model's up to float rounding."""
  return jax.device_get(jax.jit(fold)(params)) if _has_adapters(params) else params


def _has_adapters(params: PyTree) -> bool:
  return any(p.endswith(f'/{A}') for p in paths.flatten(params))


def load_params(
  directory: Any, expected: PyTree, *, key: str = 'params', step: int | None = None, **kwargs
) -> PyTree:
  """`checkpoint.load_params` that reads a LoRA run's checkpoint as plain parameters: the
  stored adapters are loaded (strictly, as every other leaf) and folded into their kernels.
  A checkpoint without adapters loads exactly as `checkpoint.load_params` does.

  Args:
    directory, expected, key, step, kwargs: as `checkpoint.load_params`; `expected` is the
      plain model's tree.

  Returns:
    A tree with the structure of `expected` (numpy leaves).

  Raises:
    As `checkpoint.load_params`.
  """
  stored = checkpoint.stored_shapes(directory, step, key)
  adapters = {p: s for p, s in stored.items() if is_adapter(p)}
  if not adapters:
    return checkpoint.load_params(directory, expected, key=key, step=step, **kwargs)
  flat = paths.flatten(expected)
  dtype = lambda p: (
    jnp.float32 if p.endswith(ALPHA) else flat[f'{p.rsplit("/", 1)[0]}/kernel'].dtype
  )
  flat.update({p: jax.ShapeDtypeStruct(s, dtype(p)) for p, s in adapters.items()})
  loaded = checkpoint.load_params(directory, paths.unflatten(flat), key=key, step=step, **kwargs)
  return merge(loaded)


def counts(params: PyTree) -> Mapping[str, int]:
  """`{layer: adapter parameters}` (`lora_a` + `lora_b` sizes: r (k k Cin + Cout) for a
  conv, r (in + out) for a dense kernel) of the adapted layers."""
  out = {}
  for p, x in paths.flatten(params).items():
    layer, leaf = p.rsplit('/', 1)
    if leaf in (A, B):
      out[layer] = out.get(layer, 0) + int(np.prod(x.shape))
  return out


def describe(params: PyTree) -> str:
  """One line for the audit table: the adapted layers, rank, alpha and adapter count."""
  found, flat = counts(params), paths.flatten(params)
  layer = next(iter(found))
  rank, alpha = flat[f'{layer}/{A}'].shape[-1], flat[f'{layer}/{ALPHA}']
  alpha = '' if isinstance(alpha, jax.ShapeDtypeStruct) else f', alpha {float(alpha):g}'
  return (
    f'LoRA (rank {rank}{alpha}): {sum(found.values()):,} adapter parameters on {len(found)} '
    'frozen kernels, folded into them for export, soups and evaluation (lora.merge)'
  )
