"""The pretrain demo's table, plot and README section, the README section writer, and the
few-shot run config the offline studies start from (the studies themselves: test_study.py; the
pretrain demo's stages: test_main.py)."""

import importlib.util
import json
import os

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
