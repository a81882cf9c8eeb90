"""The plan language's vocabulary: every method, declared once, where it is implemented.

A method is a term of a plan expression (`ftlab.plans.syntax`). Each one is an instance of
one of five kinds, registered by the module of `ftlab.plans.methods` that implements it:

  Selector   which parameters (or single entries of them) train: `bitfit`, `fisher(0.01)`
  Tuner      a selector that adds adapter leaves beside frozen kernels and folds them back
             into plain parameters (`ftlab.plans.tuners`): `lora(8)`
  Modifier   reshapes learning rates or adds a gradient term: `layerwise_lr_decay(0.7)`
  Schedule   a plan in stages: `lp_ft(probe_steps=100)`
  Dynamic    a per-element mask that changes during training: `rigl(0.01, every=100, ...)`

A method declares its name, its parameters (with defaults), a one-line summary and the paper
it comes from. The parser checks expressions against these declarations; `--help`, the audit
table and the README's policy table are made from them (`rows`, `help_text`), so a new method
is one new module and its test file. Registration is open: a test or a user's
module may `register` a method of its own before making a plan.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar, Mapping

from ftlab.errors import InputError

KINDS = ('selector', 'tuner', 'modifier', 'schedule', 'dynamic')


class PlanError(InputError):
  """A plan that cannot be made: a bad expression, policy argument or rule, in one line."""


class _Required:
  def __repr__(self) -> str:
    return 'REQUIRED'


# A sentinel rather than None: None is how an expression (or an unset config field) says
# "not given" (`Method.arguments`), so it cannot also mean "has no default".
REQUIRED = _Required()  # the default of a parameter that must be given


@dataclasses.dataclass(frozen=True)
class Param:
  """One parameter of a method.

  Attributes:
    name: as written in expressions (`density`, `train_head`).
    default: its value when not given, or `REQUIRED`; the method checks the value.
    calls: for a parameter whose value is another method's call (`reselect`'s `policy`), the
      methods it may name; empty for a literal.
    from_config: a bare name (`last_blocks`, no parentheses) takes this parameter from the
      config's policy section (`config.policy.k`), as plans were written before expressions.
  """

  name: str
  default: Any = REQUIRED
  calls: tuple[str, ...] = ()
  from_config: bool = False

  def __str__(self) -> str:
    if self.default is REQUIRED:
      return self.name
    return f'{self.name}={self.default!r}'


@dataclasses.dataclass(frozen=True)
class Call:
  """One method with the arguments the expression gave it (by parameter name).

  Only the arguments written (or read from the config) are held, so `str(call)` is the plan's
  name as runs have always recorded it; `Method.arguments` fills in the defaults.
  """

  name: str
  # Pairs in a tuple, not a dict: the call is frozen and hashable (it sits inside expressions,
  # stages and plan keys), and keeps the order the arguments were written in.
  args: tuple[tuple[str, Any], ...] = ()

  def get(self, key: str, default: Any = None) -> Any:
    return dict(self.args).get(key, default)

  def __str__(self) -> str:
    # A nested call prints as a call, a literal as Python source, so the name parses back to the
    # same call.
    text = lambda v: str(v) if isinstance(v, Call) else repr(v)
    return f'{self.name}({", ".join(f"{k}={text(v)}" for k, v in self.args)})'


class Method:
  """The declaration every method carries (set as class attributes by its module).

  Attributes:
    name: the term's name in expressions.
    kind: one of `KINDS` (set by the kind's base class).
    params: the parameters, in positional order.
    summary: one line: what it trains or does (the README's table and `--help`).
    paper: where the method comes from (authors, venue), or '' for a plain baseline.
  """

  name: ClassVar[str] = ''
  kind: ClassVar[str] = ''
  params: ClassVar[tuple[Param, ...]] = ()
  summary: ClassVar[str] = ''
  paper: ClassVar[str] = ''

  def arguments(self, call: Call) -> dict[str, Any]:
    """`{param: value}` of `call`, defaults filled in (`REQUIRED` where none was given);
    a value of None counts as not given."""
    given = {k: v for k, v in call.args if v is not None}
    return {p.name: given.get(p.name, p.default) for p in self.params}

  def signature(self) -> str:
    """`name(p1, p2=default, ...)`, as the README and `--help` show it."""
    return f'{self.name}({", ".join(str(p) for p in self.params)})'


class Selector(Method):
  """Which parameters train: `select(call, ctx) -> {path: level}` (`ftlab.plans.selection`).

  Attributes:
    per_element: chooses single entries of leaves (a mask per entry), not whole leaves.
    scores: the score pass its first mask reads (`fisher`, `gradient`), or '' for none.
  """

  kind: ClassVar[str] = 'selector'
  per_element: ClassVar[bool] = False
  scores: ClassVar[str] = ''

  def select(self, call: Call, ctx: Any) -> Mapping[str, Any]:
    raise NotImplementedError

  def scores_needed(self, call: Call) -> str:
    """The score pass this call reads to choose its first mask ('' for none)."""
    del call
    return self.scores


class Modifier(Method):
  """Learning-rate shapes and gradient terms that apply to the whole plan.

  Attributes:
    group: modifiers of one group exclude each other (e.g. two learning-rate shapes).
  """

  kind: ClassVar[str] = 'modifier'
  group: ClassVar[str] = ''

  def lr_scale(self, call: Call, paths: list[str], structure: Any) -> dict[str, float] | None:
    """`{path: factor}` multiplying each leaf's learning rate, or None."""
    del call, paths, structure
    return None

  def term(self, call: Call, paths: list[str], structure: Any, trainable: set[str]) -> Any:
    """Data for `transform` (held by the plan under the method's name), or None."""
    del call, paths, structure, trainable
    return None

  def transform(self, term: Any, anchor: Mapping[str, Any]) -> Any:
    """The optax transformation adding this term's gradient (after clipping, before decay);
    `anchor` holds the loaded parameters by path."""
    raise NotImplementedError

  def describe(self, term: Any) -> str:
    """One line for the audit table."""
    del term
    return ''


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of a schedule: its trainable set, length in steps (None: to the run's end) and
  learning-rate factor."""

  selection: Any
  steps: int | None
  lr_scale: float = 1.0


class Schedule(Method):
  """A plan in stages; it stands alone with modifiers, or takes the set written after it.

  Attributes:
    takes_set: '' (the schedule chooses every stage's set), or `tuner`: `schedule + set` is
      allowed when the set trains a tuner (lp_ft's second stage as LoRA).
  """

  kind: ClassVar[str] = 'schedule'
  takes_set: ClassVar[str] = ''

  def stages(
    self, call: Call, selection: Any, structure: Any, total_steps: int | None
  ) -> list[StageSpec]:
    raise NotImplementedError


class Dynamic(Selector):
  """A per-element mask that changes during training (`ftlab.plans.dynamic_masks`):
  `select` chooses the first mask and sets `ctx.dynamic`; `next_mask` the following ones."""

  kind: ClassVar[str] = 'dynamic'
  per_element: ClassVar[bool] = True

  def next_mask(self, before: Mapping, magnitudes: Mapping, scores: Mapping, dynamic: Any) -> dict:
    """The new `{path: bool array}` mask (jnp, traced), `dynamic.count` entries."""
    raise NotImplementedError

  def describe(self, dynamic: Any) -> str:
    """What happens at each change, for the audit table ('drop and grow 0.3 of them')."""
    raise NotImplementedError


_METHODS: dict[str, Method] = {}


def register(method: Method | type[Method]) -> Any:
  """Adds a method (an instance, or a class: instantiated) to the vocabulary; usable as a
  class decorator. Registering a name again replaces it (a test's toy method).

  Raises:
    TypeError: not a `Method`, or one without a name or kind.
  """
  # Methods are stateless declarations: one instance serves every plan. The class itself is
  # returned, so the decorator leaves the module's name bound to the class.
  instance = method() if isinstance(method, type) else method
  if not isinstance(instance, Method) or not instance.name or instance.kind not in KINDS:
    raise TypeError(f'{method!r} is not a named Method of a kind in {KINDS}')
  _METHODS[instance.name] = instance
  return method


def unregister(name: str) -> None:
  """Removes a method (a test's toy method, when the test ends)."""
  _METHODS.pop(name, None)


def _load_methods() -> None:
  """Imports every module of `ftlab.plans.methods`: each registers what it implements."""
  from ftlab.plans import methods

  for info in pkgutil.iter_modules(methods.__path__):
    importlib.import_module(f'{methods.__name__}.{info.name}')


_loaded = False


def methods() -> dict[str, Method]:
  """Every registered method by name, in registration order."""
  global _loaded
  if not _loaded:
    # Set before the imports: each method module imports this one, and a module that asked for
    # the vocabulary while being imported must not start the loading again.
    _loaded = True
    _load_methods()
  return dict(_METHODS)


def get(name: str) -> Method | None:
  """The method `name`, or None."""
  return methods().get(name)


def of_kind(*kinds: str) -> dict[str, Method]:
  """The registered methods of the given kinds, by name."""
  return {n: m for n, m in methods().items() if m.kind in kinds}


def rows() -> list[tuple[str, str, str, str]]:
  """`(signature, kind, summary, paper)` of every method, by kind then name: the data of the
  README's policy table (`scripts/readme_tables.py`) and of `help_text`."""
  order = {k: i for i, k in enumerate(KINDS)}
  # Sorted by kind, then name, not by registration: the README's table must not change with
  # the order in which modules happen to be imported.
  found = sorted(methods().values(), key=lambda m: (order[m.kind], m.name))
  return [(m.signature(), m.kind, m.summary, m.paper) for m in found]


def help_text() -> str:
  """The methods for `--help`, one per line, grouped by kind."""
  return '\n'.join(f'  {sig:<58} {kind:<9} {summary}' for sig, kind, summary, _ in rows())
