"""Short text for a study table's cells, from `ftlab.analysis.stats` results.

The library returns numbers; how they read in a table is decided here, once, so every study
table says the same thing the same way:

- a short cell (`mean_std`): `70.80 ± 2.30`, for a grid without the study's protocol;
- a cell: `70.8 ± 2.3 (95% CI [65.1, 76.5], n=3)`: mean ± sample standard deviation over seeds,
  then the Student-t interval of the mean; one seed says so instead of showing an interval;
- a comparison with the baseline: `+3.1 (95% CI [1.2, 5.0], p=0.012, n=3)`, and
  `+0.4 (95% CI [-1.1, 1.9], p=0.42, n=3), not distinguishable` when the interval covers 0, so a
  difference smaller than the seed-to-seed noise is never read as a gain.

Brackets rather than a dash: intervals of differences have negative ends.
"""

from ftlab.analysis import stats


def mean_std(values, scale: float = 100, digits: int = 2) -> str:
  """A short cell: `85.10 ± 0.42` (mean ± sample std over seeds), `85.10` for one value, ''
  for none; for tables whose runs are not a study's (the sweep's)."""
  if not len(values):
    return ''
  summary = stats.summarize(values)
  mean = f'{scale * summary.mean:.{digits}f}'
  return mean + (f' ± {scale * summary.std:.{digits}f}' if summary.has_interval else '')


def describe(summary: stats.Summary, scale: float = 100, digits: int = 1) -> str:
  """One cell: mean ± std, the confidence interval and n.

  Args:
    summary: from `stats.summarize`.
    scale: multiplies every number (100: fractions shown as percentages).
    digits: decimals shown.
  """
  mean = f'{scale * summary.mean:.{digits}f}'
  if not summary.has_interval:
    return f'{mean} (one seed, no interval)'
  low, high = (f'{scale * x:.{digits}f}' for x in (summary.low, summary.high))
  return (
    f'{mean} ± {scale * summary.std:.{digits}f} '
    f'({100 * summary.confidence:g}% CI [{low}, {high}], n={summary.n})'
  )


def describe_comparison(comparison: stats.Comparison, scale: float = 100, digits: int = 1) -> str:
  """One plan against the baseline: signed mean difference, its interval, p and n; ends in
  `, not distinguishable` when the interval covers 0; one seed has neither interval nor test.

  Args:
    comparison: from `stats.paired`.
    scale: multiplies the differences (100: fractions shown as percentage points).
    digits: decimals shown for the differences; p is shown to two significant digits.
  """
  mean = f'{scale * comparison.mean:+.{digits}f}'
  if comparison.n < 2:
    return f'{mean} (one seed: no interval, no test)'
  low, high = (f'{scale * x:.{digits}f}' for x in (comparison.low, comparison.high))
  # A p below what two digits can show is printed as a bound, never as 0.
  p = f'p={comparison.p_value:.2g}' if comparison.p_value >= 1e-4 else 'p<0.0001'
  text = f'{mean} ({100 * comparison.confidence:g}% CI [{low}, {high}], {p}, n={comparison.n})'
  return text if comparison.distinguishable else text + ', not distinguishable'
