"""The demo script's table, plot and README update (the stages themselves: test_main.py)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_demo():
  spec = importlib.util.spec_from_file_location('demo_script', f'{ROOT}/scripts/demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ROWS = [
  dict(name='scratch', trainable_parameters=1000, trainable_percent=100.0, final_eval_accuracy=0.5),
  dict(
    name='linear_probe', trainable_parameters=10, trainable_percent=1.0, final_eval_accuracy=0.75
  ),
]


def test_table_plot_and_readme_section(tmp_path):
  demo = load_demo()
  table = demo.results_table({'steps': 7, 'final_eval_accuracy': 0.9}, ROWS)
  assert 'for 7 steps, 90.0% on their test images' in table
  assert '| from scratch (full, random init) | 1,000 | 100.00% | 50.0% |' in table
  assert '| linear probe (new head only) | 10 | 1.00% | 75.0% |' in table
  demo.plot(ROWS, str(tmp_path / 'plot.png'))
  assert (tmp_path / 'plot.png').read_bytes()[:4] == b'\x89PNG'
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{demo.MARKERS[0]}\nold\n{demo.MARKERS[1]}\nrest\n')
  demo.update_readme(str(readme), table)
  assert readme.read_text() == f'intro\n{demo.MARKERS[0]}\n{table}\n{demo.MARKERS[1]}\nrest\n'
  readme.write_text('no markers')
  with pytest.raises(ValueError, match='has no <!-- demo-results:start -->'):
    demo.update_readme(str(readme), table)
