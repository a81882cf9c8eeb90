"""The pretrain demo's table, plot and README section, the README section writer, and the
few-shot run config the offline studies start from (the studies themselves: test_study.py; the
pretrain demo's stages: test_main.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import fewshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
  spec = importlib.util.spec_from_file_location(f'{name}_script', f'{ROOT}/scripts/{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_pretrain_study_starts_every_plan_but_scratch_from_the_source(tmp_path):
  study = load_script('study')
  spec = load_script('pretrain_demo').study_spec(str(tmp_path / 'source'), 2, runlocal=True)
  config = study.load_study(spec)
  assert config['seeds'] == [0, 1] and config['baseline'] == 'full'
  runs = {
    plan: study.run_config(config, study.Job('fashion_mnist_5_9', plan, 1, 0.02), str(tmp_path))
    for plan in config['plans']
  }
  assert runs['scratch'].init.checkpoint == '' and runs['scratch'].init.dont_load == ()
  for plan in ('linear_probe', 'last_blocks', 'full'):
    assert runs[plan].init.checkpoint == str(tmp_path / 'source')
    assert runs[plan].init.dont_load == ('fc/.*', 'predictions/.*')  # a new head
  assert runs['last_blocks'].policy.name == 'last_blocks(1)'
  assert runs['full'].dataset.classes == (5, 6, 7, 8, 9) and runs['full'].seed == 1
  with pytest.raises(study.StudyError, match='pretrain source is empty'):
    study.load_study('configs/studies/pretrain.py')


@pytest.mark.slow
def test_pretrain_demo_pretrains_then_runs_the_study_and_a_rerun_trains_nothing(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text(
    '# x\n<!-- pretrain-demo-results:start -->\nold\n<!-- pretrain-demo-results:end -->\n'
  )
  command = [sys.executable, f'{ROOT}/scripts/pretrain_demo.py', '--workdir', str(tmp_path / 'w')]
  command += ['--runlocal', '--seeds', '1', '--readme', str(readme)]
  first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  assert first.returncode == 0, first.stderr[-3000:]
  assert '4 runs trained, 0 done before' in first.stdout
  report = json.loads((tmp_path / 'w' / 'report.json').read_text())
  assert [r['plan'] for r in report['runs']] == ['scratch', 'linear_probe', 'last_blocks', 'full']
  assert (tmp_path / 'w' / 'report.md').read_text().strip() in readme.read_text()
  assert (tmp_path / 'docs' / 'pretrain-demo-results_heatmap.png').exists()
  again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
  assert again.returncode == 0 and '0 runs trained, 4 done before' in again.stdout


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
