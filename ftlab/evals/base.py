"""The evaluator protocol: what a run measures at each eval, one module per evaluator.

As big_vision's evaluators (`Evaluator(**config).run(train_state)`), an evaluator is built
from its own config section (`config.evals.<name>`), compiled once per stage and run at every
eval; the loop iterates over the evaluators it was given and names none of them:

  build(setting) -> Evaluator | None   from its config section (None: switched off)
  splits() -> {name: DataSplit}        splits it reads, for the activation cache to hold
  start_stage(stage)                   compiles what it runs for the stage's model and plan
  run(state) -> {metric: float}        at each eval, on the replicated train state
  summary(metrics) -> {field: value}   what `summary.json` says of its last metrics

Metric names carry a prefix (`eval/accuracy` for a split, `fewshot/5shot_accuracy`). An
evaluator registers itself where it is defined (`@register`); `ftlab.evals` imports every
module of the family, so a new evaluator is one new module.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, ClassVar, Iterator, Mapping

import flax.linen as nn

from ftlab.data.datasets import DataSplit
from ftlab.data.input_pipeline import Data
from ftlab.parallel import Spread

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Setting:
  """What an evaluator is built with.

  Attributes:
    config: its own config section (`config.evals.<name>`; empty where the config has none).
    model: the run's model (unbound, the whole network).
    data: the run's splits, order and image preparation.
    spread: how steps run over the devices.
    variables: the run's initial variables (`{'params', 'batch_stats'}`).
    init_directory: the checkpoint the initial weights were read from ('' for a random start).
    build_split: `(split, examples_per_class=0, what='') -> DataSplit` of the run's dataset
      (`what` names the setting that asks for the per-class budget, for its error).
    split_names: the configured `train` and `eval` split names (before any minival is
      carved off), for evaluators that default to them.
    ema: whether the train state carries a moving average of the weights.
  """

  config: Any
  model: nn.Module
  data: Data
  spread: Spread
  variables: PyTree
  init_directory: str
  build_split: Callable[..., DataSplit]
  split_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
  ema: bool = False


@dataclasses.dataclass(frozen=True)
class StageView:
  """What an evaluator compiles for at a stage's start.

  Attributes:
    plan: the stage's plan (`ftlab.plans.policies.Plan`).
    model: the model the stage's steps run: the whole network, or the rest of it after a
      cached prefix (`VGG(start_block=...)`).
    eval_batches: `{split: () -> padded batches}` of the data's evaluated splits, as images or
      as cached prefix outputs for `model`.
    start: the first block `model` runs ('' for the whole network).
    extra_batches: `{name: () -> batches}` of the evaluators' own `splits()` as cached prefix
      outputs (empty when the stage runs uncached).
  """

  plan: Any
  model: nn.Module
  eval_batches: Mapping[str, Callable[[], Iterator[dict]]]
  start: str = ''
  extra_batches: Mapping[str, Callable[[], Iterator[dict]]] = dataclasses.field(
    default_factory=dict
  )


class Evaluator:
  """The protocol (see the module docstring); `name` is its config section and metric prefix."""

  name: ClassVar[str] = ''

  @classmethod
  def build(cls, setting: Setting) -> Evaluator | None:
    raise NotImplementedError

  def splits(self) -> dict[str, DataSplit]:
    """Splits the evaluator reads, by name, for the activation cache (default: none)."""
    return {}

  def start_stage(self, stage: StageView) -> None:
    raise NotImplementedError

  def run(self, state: Any) -> dict[str, float]:
    raise NotImplementedError

  def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
    """`summary.json` fields from the evaluator's last metrics (default: none)."""
    del metrics
    return {}


_EVALUATORS: dict[str, type[Evaluator]] = {}
# The family's modules are imported on first use, not at import of this one: each of them
# imports `base` to register itself, so importing them here would be circular.
_loaded = False


def register(cls: type[Evaluator]) -> type[Evaluator]:
  """Class decorator: adds an evaluator by its `name` (registering a name again replaces it).

  Raises:
    TypeError: not a named `Evaluator` subclass.
  """
  if not (isinstance(cls, type) and issubclass(cls, Evaluator) and cls.name):
    raise TypeError(f'{cls!r} is not a named Evaluator subclass')
  _EVALUATORS[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Removes an evaluator (a test's toy one, when the test ends)."""
  _EVALUATORS.pop(name, None)


def evaluators() -> dict[str, type[Evaluator]]:
  """Every registered evaluator class by name, in registration order (the family's modules
  are imported first, in name order)."""
  global _loaded
  if not _loaded:
    # Set before importing, so a module that asks for the registry while it is imported does
    # not start the import loop again.
    _loaded = True
    from ftlab import evals

    for info in pkgutil.iter_modules(evals.__path__):
      importlib.import_module(f'{evals.__name__}.{info.name}')
  # A copy: a caller iterating over it is not disturbed by a test registering a toy evaluator.
  return dict(_EVALUATORS)


def build(setting_for: Callable[[str], Setting]) -> tuple[Evaluator, ...]:
  """Every registered evaluator that its setting switches on, in registration order.

  Args:
    setting_for: `name -> Setting` (the run gives each evaluator its own config section).

  Raises:
    InputError: what an evaluator's `build` raises for a bad config section.
  """
  # Every evaluator is built (and its config section checked) at launch, before any data is
  # read or step compiled; one switched off by its section answers None.
  built = (cls.build(setting_for(name)) for name, cls in evaluators().items())
  return tuple(e for e in built if e is not None)
