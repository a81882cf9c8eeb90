"""The demo scripts' tables, plots, learning-rate choice and README updates, and the few-shot
demo end to end on a narrow random VGG (the pretrain demo's stages: test_main.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import fewshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
  spec = importlib.util.spec_from_file_location(f'{name}_script', f'{ROOT}/scripts/{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ROWS = [
  dict(name='scratch', trainable_parameters=1000, trainable_percent=100.0, final_eval_accuracy=0.5),
  dict(
    name='linear_probe', trainable_parameters=10, trainable_percent=1.0, final_eval_accuracy=0.75
  ),
]


def test_pretrain_demo_table_plot_and_readme_section(tmp_path):
  demo = load_script('pretrain_demo')
  table = demo.results_table({'steps': 7, 'final_eval_accuracy': 0.9}, ROWS)
  assert 'for 7 steps, 90.0% on their test images' in table
  assert '| from scratch (full, random init) | 1,000 | 100.00% | 50.0% |' in table
  assert '| linear probe (new head only) | 10 | 1.00% | 75.0% |' in table
  demo.plot(ROWS, str(tmp_path / 'plot.png'))
  assert (tmp_path / 'plot.png').read_bytes()[:4] == b'\x89PNG'


def test_readme_section_is_replaced_or_refused(tmp_path):
  readme_section = load_script('readme_section')
  markers = ('<!-- x:start -->', '<!-- x:end -->')
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{markers[0]}\nold\n{markers[1]}\nrest\n')
  readme_section.replace(str(readme), markers, 'new\ntable')
  assert readme.read_text() == f'intro\n{markers[0]}\nnew\ntable\n{markers[1]}\nrest\n'
  readme.write_text('no markers')
  with pytest.raises(ValueError, match='has no <!-- x:start --> ... <!-- x:end --> section'):
    readme_section.replace(str(readme), markers, 'new')


def summary(accuracy, trainable=100, percent=1.0, seconds=10.0):
  return dict(
    final_eval_accuracy=accuracy,
    trainable_parameters=trainable,
    trainable_percent=percent,
    wall_time_sec=seconds,
  )


def test_fewshot_rows_are_mean_and_sample_std_over_seeds(tmp_path):
  demo = load_script('demo')
  runs = {
    'linear_probe': [summary(0.5, seconds=4), summary(0.6, seconds=6), summary(0.7, seconds=8)],
    'full': [summary(0.8, 1000, 100.0)] * 3,
  }
  rows = demo.aggregate(runs, {'linear_probe': 1e-3, 'full': 1e-4})
  accuracies = [0.5, 0.6, 0.7]
  assert rows[0]['mean'] == pytest.approx(np.mean(accuracies))
  assert rows[0]['std'] == pytest.approx(np.std(accuracies, ddof=1))  # 0.1
  assert rows[0]['seconds'] == 6 and rows[1]['std'] == pytest.approx(0)
  table = demo.results_table(rows, shots=10, seeds=[0, 1, 2], eval_examples=1000)
  assert '10 labelled images per class (all 10 classes), 3 seeds (0, 1, 2)' in table
  assert (
    '| linear probe: the new head | 100 | 1.00% | 0.001 | 60.0 ± 10.0% | 50.0, 60.0, 70.0 | 6 |'
    in table
  )
  assert '| full fine-tuning | 1,000 | 100.00% | 0.0001 | 80.0 ± 0.0% |' in table
  assert 'learning rate chosen per plan on minival' in table
  unselected = demo.results_table(rows, shots=50, seeds=[0], eval_examples=10, selected=False)
  assert 'none chosen on minival yet: run --select' in unselected
  demo.plot(rows, 10, str(tmp_path / 'plot.png'))
  assert (tmp_path / 'plot.png').read_bytes()[:4] == b'\x89PNG'


def test_learning_rate_choice_is_the_minival_best_and_merges_into_the_file(tmp_path):
  demo = load_script('demo')
  minival = {
    'full': {'0.0001': 0.7, '0.0003': 0.8, '0.001': 0.8, '0.003': 0.1},  # tie: smaller lr
    'linear_probe': {'0.0001': 0.2, '0.0003': 0.3, '0.001': 0.4, '0.003': 0.5},
  }
  assert demo.choose(minival) == {'full': 3e-4, 'linear_probe': 3e-3}
  table = demo.selection_table(minival, demo.choose(minival))
  assert '| full fine-tuning | 70.0% | **80.0%** | 80.0% | 10.0% |' in table
  path = str(tmp_path / 'lrs.json')
  demo.record_choice(path, 10, {'full': minival['full']})
  demo.record_choice(path, 10, {'linear_probe': minival['linear_probe']})
  demo.record_choice(path, 50, {'full': {'0.001': 0.9}})
  with open(path) as f:
    record = json.load(f)
  assert record['chosen'] == {'10': {'full': 3e-4, 'linear_probe': 3e-3}, '50': {'full': 1e-3}}
  assert record['minival']['10'] == minival


def test_fewshot_config_plans_splits_and_refusals(monkeypatch, tmp_path):
  config = fewshot.get_config('plan=lp_ft,shots=50,seed=2')
  assert config.policy.name == f'lp_ft(probe_steps={fewshot.STEPS // 2}, probe_lr_multiplier=100)'
  assert (config.dataset.examples_per_class, config.seed) == (50, 2)
  assert config.dataset.train_split == f'train[:-{fewshot.MINIVAL}]'
  assert config.dataset.eval_split == fewshot.EVAL_SPLIT
  assert config.init.checkpoint == fewshot.WEIGHTS and config.activation_cache == 'disk'
  # Choices are made on the held-out end of the training split, never on test.
  assert fewshot.get_config('plan=full,select').dataset.eval_split == f'train[-{fewshot.MINIVAL}:]'
  scratch = fewshot.get_config('plan=scratch')
  assert (scratch.init.checkpoint, scratch.activation_cache) == ('scratch', 'off')
  assert fewshot.get_config('plan=full,lr=0.02').optimizer.learning_rate == 0.02
  lrs = tmp_path / 'lrs.json'
  lrs.write_text(json.dumps({'chosen': {'10': {'full': 3e-4}}}))
  monkeypatch.setattr(fewshot, 'LEARNING_RATES_FILE', str(lrs))
  assert fewshot.get_config('plan=full').optimizer.learning_rate == 3e-4
  assert fewshot.get_config('plan=lp_ft,runlocal').policy.name.startswith('lp_ft(probe_steps=3,')
  with pytest.raises(ValueError, match="fewshot plan 'probe' is not one of scratch, linear_probe"):
    fewshot.get_config('plan=probe')


@pytest.mark.slow
def test_fewshot_demo_end_to_end_resumes_and_writes_the_readme(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text(
    'top\n<!-- demo-results-10shot:start -->\nold\n<!-- demo-results-10shot:end -->\n'
  )
  command = [
    sys.executable,
    f'{ROOT}/scripts/demo.py',
    f'--workdir={tmp_path / "w"}',
    '--runlocal',
    '--seeds=0,1',
    '--plans=linear_probe,lp_ft',
    f'--readme={readme}',
  ]
  # A README without the section is refused before any run, in one line.
  (tmp_path / 'OTHER.md').write_text('no section\n')
  other = f'--readme={tmp_path / "OTHER.md"}'
  bad = [other if c.startswith('--readme') else c for c in command]
  refused = subprocess.run(bad, capture_output=True, text=True, timeout=900, cwd=tmp_path)
  assert refused.returncode == 2 and not (tmp_path / 'w').exists()
  assert 'has no <!-- demo-results-10shot:start -->' in refused.stderr.splitlines()[-1]
  out = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / 'w' / 'results_10shot.json').read_text())
  lrs = {row['plan']: row['learning_rate'] for row in results['plans']}
  assert [r['plan'] for r in results['plans']] == ['linear_probe', 'lp_ft']
  for row in results['plans']:
    assert len(row['accuracies']) == 2 and row['mean'] == pytest.approx(np.mean(row['accuracies']))
  # LP-FT's probe stage reads the linear probe's caches of the same seed (same random init,
  # same labelled images): one eval and one train cache per seed, not per run.
  caches = os.listdir(tmp_path / 'w' / 'activation_cache')
  assert len([c for c in caches if c.endswith('.json')]) == 2 * 2
  text = readme.read_text()
  assert '| linear probe: the new head |' in text and 'old' not in text
  assert (tmp_path / 'docs' / 'demo_results_10shot.png').exists()
  # A second call finds every run done.
  again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
  assert again.returncode == 0 and again.stdout.count('done before, skipped') == 4
  # A finished run of another config (configs/fewshot.py changed since) is not reused.
  run = tmp_path / 'w' / '10shot' / f'linear_probe_lr{lrs["linear_probe"]:g}' / 'seed0'
  config = json.loads((run / 'config.json').read_text())
  config['optimizer']['schedule'] = 'constant'
  (run / 'config.json').write_text(json.dumps(config))
  stale = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
  assert stale.returncode == 2
  assert "optimizer.schedule='cosine' (was 'constant')" in stale.stderr.splitlines()[-1]


def test_paired_table_against_a_baseline_says_when_seeds_cannot_tell():
  demo = load_script('demo')
  runs = {
    'linear_probe': [summary(a) for a in (0.60, 0.62, 0.64)],
    'full': [summary(a, 1000) for a in (0.70, 0.72, 0.75)],  # +10, +10, +11 points
    'last_block': [
      summary(a) for a in (0.65, 0.60, 0.66)
    ],  # +5, -2, +2 points: mean 1.67, sd 3.51, half-width 4.3027 * 3.51 / sqrt(3) = 8.73
  }
  rows = demo.aggregate(runs, dict.fromkeys(runs, 1e-3))
  table = demo.paired_table(rows, 'linear_probe')
  # differences 10, 10, 11: mean 10.33, sd 0.577, t(0.975, 2) = 4.3027: [8.9, 11.8]
  assert '| full fine-tuning | +10.3 (95% CI [8.9, 11.8], p=0.001' in table
  assert (
    '| last block: block 5 + head | +1.7 (95% CI [-7.1, 10.4], p=0.5, n=3), not distinguishable |'
    in table
  )
  assert 'linear probe: the new head |' not in table.split('|---|---|')[1]
  with pytest.raises(ValueError, match="--baseline 'nope' is not among"):
    demo.paired_table(rows, 'nope')
