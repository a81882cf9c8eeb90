"""Statistics over seeds and tasks: a hand-worked example, scipy.stats on fixed numbers, the edge
cases (one seed, zero spread, NaN) and the errors."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ftlab.analysis import stats
from ftlab.errors import InputError
from scripts import study_tables

# Fixed per-seed accuracies (fractions), three to five seeds: what a study's cells look like.
SAMPLES = [
  [0.708, 0.731, 0.685],
  [0.912, 0.905, 0.921, 0.899, 0.917],
  [0.5, 0.25, 0.75, 1.0],
]
# (plan, baseline) pairs on the same seeds: a difference within the noise, one above it, and
# one below it.
PAIRS = [
  ([0.71, 0.74, 0.69, 0.73], [0.70, 0.70, 0.68, 0.71]),
  ([0.81, 0.83, 0.80, 0.84, 0.82], [0.70, 0.73, 0.71, 0.72, 0.70]),
  ([0.61, 0.58, 0.60], [0.70, 0.69, 0.72]),
]


def test_summary_of_one_two_three_by_hand():
  """1, 2, 3: mean 2, sd 1, sem 1/sqrt(3). With 2 degrees of freedom the t quantile has a closed
  form, t(q) = (2q - 1) / sqrt(2q(1 - q)): t(0.975) = 0.95 / sqrt(0.04875) = 4.3026527297494...
  (4.303 in printed tables)."""
  s = stats.summarize([1, 2, 3])
  t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
  assert t == pytest.approx(4.303, abs=5e-4)
  half = t / math.sqrt(3)
  assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
  assert s.sem == pytest.approx(1 / math.sqrt(3), rel=1e-15)
  # rel 1e-9: scipy's t quantile moved by 6e-11 between 1.14.0 (the floor) and 1.17.
  assert (s.low, s.high) == pytest.approx((2 - half, 2 + half), rel=1e-9)
  assert (s.low, s.high) == pytest.approx((-0.4841377117503, 4.4841377117503), abs=1e-9)
  assert s.values == (1.0, 2.0, 3.0) and s.seeds is None and s.has_interval


@pytest.mark.parametrize('values', SAMPLES)
@pytest.mark.parametrize('confidence', [0.95, 0.9])
def test_summary_matches_scipy(values, confidence):
  s = stats.summarize(values, confidence)
  sem = scipy_stats.sem(values)
  low, high = scipy_stats.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=sem)
  assert s.mean == pytest.approx(np.mean(values), rel=1e-14)
  assert s.std == pytest.approx(np.std(values, ddof=1), rel=1e-14)
  assert s.sem == pytest.approx(sem, rel=1e-14)
  assert (s.low, s.high) == pytest.approx((low, high), rel=1e-12)
  assert s.confidence == confidence


def test_one_seed_has_no_interval():
  s = stats.summarize([0.7])
  assert (s.n, s.mean, s.has_interval) == (1, 0.7, False)
  assert all(math.isnan(x) for x in (s.std, s.sem, s.low, s.high))


def test_equal_values_have_exactly_zero_spread():
  # np.mean([0.1] * 3) is 0.10000000000000002: the spread must not come from that rounding.
  s = stats.summarize([0.1, 0.1, 0.1])
  assert (s.mean, s.std, s.sem, s.low, s.high) == (0.1, 0.0, 0.0, 0.1, 0.1)


def test_values_by_seed_keep_their_seeds():
  s = stats.summarize({0: 0.5, 7: 0.75, 3: 1.0})
  assert s.seeds == (0, 7, 3) and s.values == (0.5, 0.75, 1.0) and s.mean == 0.75


@pytest.mark.parametrize('values, baseline', PAIRS)
@pytest.mark.parametrize('confidence', [0.95, 0.9])
def test_paired_matches_scipy_ttest_rel(values, baseline, confidence):
  c = stats.paired(values, baseline, confidence)
  ref = scipy_stats.ttest_rel(values, baseline)
  interval = ref.confidence_interval(confidence)
  assert c.n == len(values)
  assert c.mean == pytest.approx(np.mean(np.subtract(values, baseline)), rel=1e-12)
  assert c.t == pytest.approx(ref.statistic, rel=1e-12)
  assert c.p_value == pytest.approx(ref.pvalue, rel=1e-10)
  assert (c.low, c.high) == pytest.approx((interval.low, interval.high), rel=1e-12)
  # The interval excludes 0 exactly when the two-sided test rejects at 1 - confidence.
  assert c.distinguishable == (ref.pvalue < 1 - confidence)


def test_an_interval_covering_zero_is_not_distinguishable():
  within, above, below = (stats.paired(v, b) for v, b in PAIRS)
  assert within.low < 0 < within.high and not within.distinguishable
  assert above.low > 0 and above.distinguishable
  assert below.high < 0 and below.distinguishable and below.mean < 0


def test_identical_inputs_give_p_one_and_no_warning():
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # scipy's ttest_rel warns and returns nan here
    c = stats.paired([0.7, 0.8, 0.75], [0.7, 0.8, 0.75])
  assert (c.mean, c.std, c.low, c.high, c.t, c.p_value) == (0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
  assert not c.distinguishable


def test_a_constant_shift_gives_p_zero():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    c = stats.paired([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    down = stats.paired([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
  assert (c.mean, c.std, c.low, c.high, c.t, c.p_value) == (0.5, 0.0, 0.5, 0.5, math.inf, 0.0)
  assert c.distinguishable
  assert (down.t, down.p_value, down.distinguishable) == (-math.inf, 0.0, True)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # scipy's 'nearly identical data' warning
    assert scipy_stats.ttest_rel([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]).pvalue == 0.0


def test_one_pair_is_not_distinguishable():
  c = stats.paired([0.9], [0.1])
  assert c.mean == pytest.approx(0.8) and not c.distinguishable
  assert all(math.isnan(x) for x in (c.low, c.high, c.t, c.p_value))


def test_mappings_are_paired_by_seed():
  by_seed = stats.paired({1: 0.71, 2: 0.74, 3: 0.69}, {3: 0.68, 1: 0.70, 2: 0.70})
  by_position = stats.paired([0.71, 0.74, 0.69], [0.70, 0.70, 0.68])
  assert by_seed.seeds == (1, 2, 3)
  assert (by_seed.mean, by_seed.p_value) == (by_position.mean, by_position.p_value)
  with pytest.raises(ValueError, match=r'only in values: 3; only in baseline: 4'):
    stats.paired({1: 0.7, 3: 0.8}, {1: 0.7, 4: 0.8})
  with pytest.raises(TypeError, match='must both be mappings'):
    stats.paired({1: 0.7}, [0.7])


def test_unequal_lengths_raise_one_line():
  with pytest.raises(ValueError, match='3 values against 2 baseline values') as e:
    stats.paired([0.1, 0.2, 0.3], [0.1, 0.2])
  assert '\n' not in str(e.value)


@pytest.mark.parametrize(
  'call, message',
  [
    (lambda: stats.summarize([0.7, math.nan, 0.8]), r'position 1: \[nan\]'),
    (lambda: stats.summarize({4: 0.7, 5: math.inf}), r'seed 5: \[inf\]'),
    (lambda: stats.paired([0.7, 0.8], [math.nan, 0.8]), 'paired baseline: .*position 0'),
    (lambda: stats.summarize([]), 'no values'),
    (lambda: stats.summarize([[0.1, 0.2]]), 'one-dimensional'),
    (lambda: stats.summarize([0.1, 0.2], confidence=95), r'confidence must be in \(0, 1\)'),
  ],
)
def test_bad_values_raise_naming_them(call, message):
  with pytest.raises(stats.StatsError, match=message):
    call()


def test_stats_errors_are_input_errors():
  # Scripts turn an InputError into one line and exit 2 (a missing run, a diverged seed).
  assert issubclass(stats.StatsError, InputError) and issubclass(stats.StatsError, ValueError)


# Two groups of unequal size, so VTAB's mean of group means differs from the mean of tasks.
TABLE = {
  'cifar': {'full': [0.9, 0.8], 'bitfit': [0.7]},
  'dtd': {'full': [0.6], 'bitfit': [0.5, 0.7]},
  'eurosat': {'full': [0.95], 'bitfit': [0.9]},
}
GROUPS = {'cifar': 'natural', 'dtd': 'natural', 'eurosat': 'specialized'}


def test_over_tasks_with_groups_by_hand():
  out = stats.over_tasks(TABLE, GROUPS)
  assert list(out) == ['full', 'bitfit']
  # full: tasks 0.85, 0.6, 0.95; natural (0.85 + 0.6) / 2 = 0.725, specialized 0.95;
  # mean (0.725 + 0.95) / 2 = 0.8375 (the mean of tasks would be 0.8).
  full = out['full']
  assert full.tasks == pytest.approx({'cifar': 0.85, 'dtd': 0.6, 'eurosat': 0.95})
  assert full.groups == pytest.approx({'natural': 0.725, 'specialized': 0.95})
  assert full.mean == pytest.approx(0.8375)
  # bitfit: tasks 0.7, 0.6, 0.9; natural 0.65, specialized 0.9; mean 0.775.
  assert out['bitfit'].groups == pytest.approx({'natural': 0.65, 'specialized': 0.9})
  assert out['bitfit'].mean == pytest.approx(0.775)


def test_over_tasks_without_groups_is_the_mean_of_task_means():
  out = stats.over_tasks(TABLE)
  # Each task counts once, whatever its number of seeds: (0.85 + 0.6 + 0.95) / 3.
  assert out['full'].mean == pytest.approx(0.8) and out['full'].groups == {}
  assert out['bitfit'].mean == pytest.approx((0.7 + 0.6 + 0.9) / 3)


@pytest.mark.parametrize(
  'table, groups, message',
  [
    ({**TABLE, 'svhn': {'full': [0.9]}}, None, r'missing \(task, plan\) cells: \(svhn, bitfit\)'),
    (TABLE, {'cifar': 'natural', 'dtd': 'natural'}, 'without a group: eurosat'),
    (TABLE, {**GROUPS, 'svhn': 'natural'}, 'grouped but not in the table: svhn'),
    ({**TABLE, 'dtd': {'full': [math.nan], 'bitfit': [0.5]}}, None, 'dtd/full: .*position 0'),
    ({}, None, 'no tasks'),
  ],
)
def test_over_tasks_errors_name_the_cells(table, groups, message):
  with pytest.raises(stats.StatsError, match=message):
    stats.over_tasks(table, groups)


def test_tables_of_summaries_and_comparisons():
  table = {
    'cifar': {'full': PAIRS[1][0], 'linear_probe': PAIRS[1][1]},
    'dtd': dict(zip(['full', 'linear_probe'], PAIRS[0])),
  }
  summaries = stats.summarize_table(table)
  assert summaries['dtd']['full'] == stats.summarize(PAIRS[0][0])
  comparisons = stats.compare_table(table, 'linear_probe')
  assert list(comparisons['cifar']) == ['full']
  assert comparisons['cifar']['full'] == stats.paired(*PAIRS[1])
  assert not comparisons['dtd']['full'].distinguishable
  with pytest.raises(stats.StatsError, match="'lora' is not in the table"):
    stats.compare_table(table, 'lora')
  with pytest.raises(stats.StatsError, match="'linear_probe' has no results on tasks dtd"):
    stats.compare_table({**table, 'dtd': {'full': [0.5, 0.6]}}, 'linear_probe')
  with pytest.raises(
    stats.StatsError, match='cifar/full against linear_probe: paired: 1 values against 5'
  ):
    stats.compare_table(
      {**table, 'cifar': {'full': [0.5], 'linear_probe': PAIRS[1][1]}}, 'linear_probe'
    )


def test_cells_read_as_mean_std_interval_and_n():
  assert study_tables.mean_std(SAMPLES[0]) == '70.80 ± 2.30'  # the sweep's short cell
  assert study_tables.mean_std([0.7]) == '70.00' and study_tables.mean_std([]) == ''
  assert (
    study_tables.describe(stats.summarize(SAMPLES[0])) == '70.8 ± 2.3 (95% CI [65.1, 76.5], n=3)'
  )
  assert study_tables.describe(stats.summarize([0.7])) == '70.0 (one seed, no interval)'
  assert study_tables.describe(stats.summarize([1, 2, 3], 0.9), scale=1, digits=2) == (
    '2.00 ± 1.00 (90% CI [0.31, 3.69], n=3)'
  )


def test_a_difference_within_the_noise_reads_as_not_distinguishable():
  within, above, below = (study_tables.describe_comparison(stats.paired(v, b)) for v, b in PAIRS)
  assert within == '+2.0 (95% CI [-0.3, 4.3], p=0.066, n=4), not distinguishable'
  assert above == '+10.8 (95% CI [9.2, 12.4], p<0.0001, n=5)'
  assert below.startswith('-10.7 (95% CI [') and 'not distinguishable' not in below
  same = study_tables.describe_comparison(stats.paired([0.7, 0.8], [0.7, 0.8]))
  assert same == '+0.0 (95% CI [0.0, 0.0], p=1, n=2), not distinguishable'
  one = study_tables.describe_comparison(stats.paired([0.9], [0.1]))
  assert one == '+80.0 (one seed: no interval, no test)'
