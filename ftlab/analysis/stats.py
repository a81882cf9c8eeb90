"""Statistics over seeds and tasks: means, Student-t intervals, paired comparisons.

What a study's table says about a grid of finished runs, returned as data (the tables, markdown
and plots live in `scripts/`):

- `summarize`: one (task, plan) cell's per-seed values -> mean, sample standard deviation and the
  Student-t confidence interval of the mean (95% by default).
- `paired`: a plan against a baseline plan on the same task and the same seeds -> the mean
  difference, its t interval and the two-sided paired t-test's p-value. `distinguishable` says
  whether the interval excludes 0, i.e. whether the difference is larger than the seed-to-seed
  noise at that confidence; a difference whose interval covers 0 is not distinguishable.
- `over_tasks`: per plan, the mean over tasks of the per-task means, and over groups when the
  suite has them (VTAB's convention: the overall score is the mean of the group means, each the
  mean of its tasks' means).
- `summarize_table`, `compare_table`: `summarize` and `paired` over a `{task: {plan: values}}`
  table.

Values are floats in any unit (accuracy as a fraction, a loss, ...); every result keeps the unit
of its input and is a Python float computed in float64. A cell's per-seed values are either a
sequence in seed order or a mapping `{seed: value}`; `paired` matches mappings by seed and
sequences by position.

Edge cases (each tested in tests/test_stats.py):
- One seed (n = 1): the mean is that value; `std`, `sem`, `low` and `high` are nan and
  `has_interval` is False, since one seed says nothing about the noise. A paired comparison of
  one seed has `t` and `p_value` nan and is not distinguishable.
- Zero spread (n >= 2, all values equal): `std` and `sem` are exactly 0 (not rounding noise) and
  the interval is `(mean, mean)`, the formula's answer. For `paired`, identical inputs give a
  mean difference of 0, the interval (0, 0), `t` = 0 and `p_value` = 1: not distinguishable. A
  constant nonzero difference d gives the interval (d, d), `t` = ±inf and `p_value` = 0:
  distinguishable, as every seed moved by exactly d (scipy's `ttest_rel` agrees here, and gives
  nan with a RuntimeWarning for identical inputs; this module warns in neither case).
- NaN or infinite values raise `StatsError` naming where they are: a diverged run's nan accuracy
  is a result to look at, not a number to average.

Sources: the t interval and the t-test are Student's (1908, "The probable error of a mean",
Biometrika 6(1)); the paired test is the one-sample test on the per-seed differences. The t
quantile and tail probability come from `scipy.stats.t`; tests/test_stats.py checks the results
against `scipy.stats.ttest_rel`, `scipy.stats.t.interval` and `scipy.stats.sem`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from ftlab.errors import InputError

# One cell's per-seed values: a sequence in seed order, or {seed: value}.
Values = Sequence[float] | np.ndarray | Mapping[Hashable, float]
# {task: {plan: per-seed values}}.
Table = Mapping[str, Mapping[str, Values]]

# Names shown in an error before it says how many more there are.
SHOWN = 8


class StatsError(InputError):
  """Values that cannot be summarised: none, not finite, unpaired, or a table with holes."""


@dataclasses.dataclass(frozen=True)
class Summary:
  """One set of per-seed values summarised.

  Attributes:
    n: the number of values (seeds).
    mean: their mean.
    std: the sample standard deviation (ddof=1); nan for n = 1, exactly 0 when all are equal.
    sem: the standard error of the mean, `std / sqrt(n)`; nan for n = 1.
    low, high: the Student-t confidence interval of the mean, `mean ∓ t(q, n-1) * sem` with
      `q = (1 + confidence) / 2`; nan for n = 1.
    confidence: the interval's coverage (0.95 for a 95% interval).
    values: the values in the order given.
    seeds: the seeds when the values came as a mapping, else None.
  """

  n: int
  mean: float
  std: float
  sem: float
  low: float
  high: float
  confidence: float
  values: tuple[float, ...]
  seeds: tuple[Hashable, ...] | None = None

  @property
  def has_interval(self) -> bool:
    """Whether there is an interval at all: a single seed has none."""
    return self.n >= 2


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A plan against a baseline on the same seeds: the per-seed differences summarised.

  Attributes:
    n: the number of pairs (seeds).
    mean: the mean difference, values minus baseline (in the values' unit).
    std: the sample standard deviation of the differences (ddof=1; nan for n = 1).
    low, high: the Student-t confidence interval of the mean difference (nan for n = 1).
    t: the paired t statistic, `mean / (std / sqrt(n))` with n - 1 degrees of freedom; 0 for
      identical inputs, ±inf for a constant nonzero difference, nan for n = 1.
    p_value: the two-sided paired t-test's p-value: 1 for identical inputs, 0 for a constant
      nonzero difference, nan for n = 1.
    distinguishable: whether the interval excludes 0 (`low > 0` or `high < 0`); False when there
      is no interval. Equivalent to `p_value < 1 - confidence`, up to rounding at the boundary.
    confidence: the interval's coverage.
    differences: the per-seed differences, values minus baseline, in the values' order.
    seeds: the seeds when the values came as mappings, else None.
  """

  n: int
  mean: float
  std: float
  low: float
  high: float
  t: float
  p_value: float
  distinguishable: bool
  confidence: float
  differences: tuple[float, ...]
  seeds: tuple[Hashable, ...] | None = None


@dataclasses.dataclass(frozen=True)
class PlanMean:
  """One plan's mean over the tasks of a suite.

  Attributes:
    mean: the mean of the group means when the suite has groups, else of the task means.
    tasks: `{task: mean over seeds}`, in the table's task order.
    groups: `{group: mean of its tasks' means}`, in order of first appearance; empty without
      groups.
  """

  mean: float
  tasks: dict[str, float]
  groups: dict[str, float]


def _shown(names: Sequence[Any]) -> str:
  """The first few names, and how many more: error messages stay one line."""
  text = ', '.join(str(n) for n in names[:SHOWN])
  return text + (f' and {len(names) - SHOWN} more' if len(names) > SHOWN else '')


def _check_confidence(confidence: float) -> None:
  if not 0 < confidence < 1:
    raise StatsError(f'confidence must be in (0, 1), e.g. 0.95, got {confidence!r}')


def _per_seed(values: Values, where: str) -> tuple[np.ndarray, tuple[Hashable, ...] | None]:
  """`values` as a float64 vector [n] and its seeds (None for a sequence), checked.

  Raises:
    StatsError: no values, not one-dimensional, or any value NaN or infinite (named by seed,
      or by position for a sequence).
  """
  if isinstance(values, Mapping):
    seeds = tuple(values)
    array = np.asarray([values[s] for s in seeds], np.float64)
  else:
    seeds = None
    array = np.asarray(values, np.float64)
  if array.ndim != 1:
    raise StatsError(f'{where}: per-seed values must be one-dimensional, got shape {array.shape}')
  if array.size == 0:
    raise StatsError(f'{where}: no values')
  bad = np.flatnonzero(~np.isfinite(array))
  if bad.size:
    named = [f'seed {seeds[i]!r}' if seeds else f'position {i}' for i in bad]
    raise StatsError(
      f'{where}: values that are not finite at {_shown(named)}: {array[bad[:SHOWN]]}'
    )
  return array, seeds


def _t_quantile(confidence: float, n: int) -> float:
  """The two-sided Student-t critical value for `n` values (n - 1 degrees of freedom)."""
  return float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))


def _mean(array: np.ndarray) -> float:
  """The mean of a nonempty vector; exactly x for n copies of x (numpy's sum can round)."""
  return float(array[0]) if np.all(array == array[0]) else float(array.mean())


def _summarize_array(
  array: np.ndarray, seeds: tuple[Hashable, ...] | None, confidence: float
) -> Summary:
  n = array.size
  mean = _mean(array)
  if n == 1:
    std = math.nan
  elif np.all(array == array[0]):
    # Exactly 0, not the ~1e-17 that rounding in the mean would leave: equal values have no
    # spread, and a paired test of a constant shift must see sem 0 (p = 0), not a finite t.
    std = 0.0
  else:
    std = float(array.std(ddof=1))
  if n > 1:
    sem = std / math.sqrt(n)
    half = _t_quantile(confidence, n) * sem
    low, high = mean - half, mean + half
  else:
    sem = low = high = math.nan
  values = tuple(float(v) for v in array)
  return Summary(n, mean, std, sem, low, high, confidence, values, seeds)


def summarize(values: Values, confidence: float = 0.95) -> Summary:
  """Mean, sample standard deviation and Student-t confidence interval of per-seed values.

  Args:
    values: per-seed values, a sequence or `{seed: value}`; any unit.
    confidence: the interval's coverage, in (0, 1).

  Returns:
    A `Summary`. One value gives nan spread and no interval (`has_interval` False); equal
    values give std 0 and the interval (mean, mean).

  Raises:
    StatsError: no values, values that are not one-dimensional or not finite (named), or a
      confidence outside (0, 1).
  """
  _check_confidence(confidence)
  return _summarize_array(*_per_seed(values, 'summarize'), confidence)


def paired(values: Values, baseline: Values, confidence: float = 0.95) -> Comparison:
  """A plan's per-seed values against a baseline's on the same seeds: paired t interval and test.

  Args:
    values: the plan's per-seed values, a sequence or `{seed: value}`.
    baseline: the baseline's, of the same kind: mappings are paired by seed (the baseline's
      order does not matter), sequences by position.
    confidence: the interval's coverage, in (0, 1); the test is two-sided.

  Returns:
    A `Comparison` of `values - baseline`. Identical inputs give mean 0, interval (0, 0),
    p = 1, not distinguishable; a constant nonzero difference gives p = 0, distinguishable;
    one pair gives nan interval and p, not distinguishable.

  Raises:
    StatsError: different numbers of values, mappings with different seeds (named), values that
      are not finite (named), or a confidence outside (0, 1).
    TypeError: one side a mapping and the other a sequence (seeds cannot be matched).
  """
  _check_confidence(confidence)
  if isinstance(values, Mapping) != isinstance(baseline, Mapping):
    raise TypeError(
      'paired: values and baseline must both be mappings {seed: value} or both sequences'
    )
  if isinstance(values, Mapping):
    only_values = [s for s in values if s not in baseline]
    only_baseline = [s for s in baseline if s not in values]
    if only_values or only_baseline:
      raise StatsError(
        'paired: the seeds differ: '
        f'only in values: {_shown(only_values) or "none"}; '
        f'only in baseline: {_shown(only_baseline) or "none"}'
      )
    baseline = {s: baseline[s] for s in values}
  v, seeds = _per_seed(values, 'paired values')
  b, _ = _per_seed(baseline, 'paired baseline')
  if v.size != b.size:
    raise StatsError(
      f'paired: {v.size} values against {b.size} baseline values; a paired comparison needs '
      'one of each per seed'
    )
  s = _summarize_array(v - b, seeds, confidence)
  if s.n < 2:
    t = p = math.nan
  elif s.std == 0:
    # No spread: the t statistic is 0/0 (identical inputs) or d/0 (a constant shift d). Their
    # limits are the answers: no evidence of a difference, or a certain one.
    t = 0.0 if s.mean == 0 else math.copysign(math.inf, s.mean)
    p = 1.0 if s.mean == 0 else 0.0
  else:
    t = s.mean / s.sem
    p = float(2 * scipy_stats.t.sf(abs(t), s.n - 1))
  distinguishable = s.has_interval and (s.low > 0 or s.high < 0)
  return Comparison(
    s.n, s.mean, s.std, s.low, s.high, t, p, distinguishable, confidence, s.values, seeds
  )


def _plans_of(table: Table) -> list[str]:
  """Every plan in the table, in order of first appearance.

  Raises:
    StatsError: an empty table.
  """
  if not table:
    raise StatsError('the table has no tasks')
  return list(dict.fromkeys(plan for cells in table.values() for plan in cells))


def summarize_table(table: Table, confidence: float = 0.95) -> dict[str, dict[str, Summary]]:
  """`summarize` of every (task, plan) cell of `{task: {plan: per-seed values}}`.

  Returns:
    `{task: {plan: Summary}}` with the table's cells; holes stay holes (see `over_tasks` for the
    check that every plan ran on every task).

  Raises:
    StatsError: a cell whose values cannot be summarised (named `task/plan`), or a confidence
      outside (0, 1).
  """
  _check_confidence(confidence)
  return {
    task: {
      plan: _summarize_array(*_per_seed(values, f'{task}/{plan}'), confidence)
      for plan, values in cells.items()
    }
    for task, cells in table.items()
  }


def compare_table(
  table: Table, baseline: str, confidence: float = 0.95
) -> dict[str, dict[str, Comparison]]:
  """`paired` of every plan against `baseline` on each task (same task, same seeds).

  Returns:
    `{task: {plan: Comparison}}` for every plan other than the baseline present on the task.

  Raises:
    StatsError: `baseline` missing from a task (named), a pair that cannot be compared (named
      `task/plan`), or a confidence outside (0, 1).
  """
  plans = _plans_of(table)
  if baseline not in plans:
    raise StatsError(f'baseline plan {baseline!r} is not in the table; plans: {_shown(plans)}')
  without = [task for task, cells in table.items() if baseline not in cells]
  if without:
    raise StatsError(f'baseline plan {baseline!r} has no results on tasks {_shown(without)}')
  out = {}
  for task, cells in table.items():
    out[task] = {}
    for plan, values in cells.items():
      if plan == baseline:
        continue
      try:
        out[task][plan] = paired(values, cells[baseline], confidence)
      except StatsError as e:
        # Which cell: paired's own message names the seeds or positions, not the task and plan.
        raise StatsError(f'{task}/{plan} against {baseline}: {e}') from e
  return out


def over_tasks(table: Table, groups: Mapping[str, str] | None = None) -> dict[str, PlanMean]:
  """Per plan, the mean over tasks of the per-task means over seeds (and over groups).

  Every task counts once whatever its number of seeds. With `groups`, a plan's `mean` is the mean
  of its group means, each the mean of the group's task means (VTAB's convention, so a group of
  many tasks does not outweigh a small one); without, it is the mean of its task means.

  Args:
    table: `{task: {plan: per-seed values}}`; every plan must have values on every task.
    groups: `{task: group}` for every task of the table, or None.

  Returns:
    `{plan: PlanMean}` in order of the plans' first appearance.

  Raises:
    StatsError: missing (task, plan) cells (named: a mean over different tasks is not
      comparable), tasks the groups leave out or groups of tasks the table lacks (named), or a
      cell whose values cannot be summarised (named `task/plan`).
  """
  plans = _plans_of(table)
  missing = [
    f'({task}, {plan})' for task, cells in table.items() for plan in plans if plan not in cells
  ]
  if missing:
    raise StatsError(
      f'missing (task, plan) cells: {_shown(missing)}; each plan needs results on every task '
      'for its mean over tasks to be comparable'
    )
  if groups is not None:
    ungrouped = [task for task in table if task not in groups]
    absent = [task for task in groups if task not in table]
    if ungrouped or absent:
      raise StatsError(
        f'groups do not match the tasks: without a group: {_shown(ungrouped) or "none"}; '
        f'grouped but not in the table: {_shown(absent) or "none"}'
      )
  out = {}
  for plan in plans:
    tasks = {
      task: _mean(_per_seed(cells[plan], f'{task}/{plan}')[0]) for task, cells in table.items()
    }
    by_group = {}
    if groups is not None:
      for task, mean in tasks.items():
        by_group.setdefault(groups[task], []).append(mean)
    group_means = {group: float(np.mean(means)) for group, means in by_group.items()}
    mean = float(np.mean(list(group_means.values() if groups is not None else tasks.values())))
    out[plan] = PlanMean(mean, tasks, group_means)
  return out
