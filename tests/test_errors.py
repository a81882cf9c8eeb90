"""Only input errors become one line: each typed error is one line and exit 2 before anything
is written; a ValueError from inside the model keeps its traceback and exits 1."""

import os
import subprocess
import sys

import pytest

from configs import default
from ftlab import errors, loop, main
from ftlab.data import sources
from ftlab.files import checkpoint, storage, workdir
from ftlab.plans import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_field(config, dotted, value):
  *parents, leaf = dotted.split('.')
  for key in parents:
    config = config[key]
  config[leaf] = value


@pytest.mark.parametrize(
  'field, value, kind, says',
  [
    ('policy.name', 'last_blocks(k=9)', registry.PlanError, 'k=9 is not a block count'),
    ('dataset.name', 'no_such_dataset', sources.DatasetError, "unknown dataset 'no_such_dataset'"),
    ('model.dtype', 'float8', errors.ConfigError, "model dtype 'float8' is not one of"),
    ('init.checkpoint', '/nonexistent/weights', errors.InputError, '/nonexistent/weights'),
    ('batch_size', 12, errors.ConfigError, 'global batch size 12 is not divisible by 8'),
    ('parallelism', 'vmap', errors.ConfigError, "unknown parallelism 'vmap'"),
    ('optimizer.name', 'adamax', errors.ConfigError, "unknown optimizer 'adamax'"),
  ],
)
def test_each_typed_error_is_one_line_and_exit_2(tmp_path, capsys, field, value, kind, says):
  config = default.get_config('runlocal')
  set_field(config, field, value)
  with pytest.raises(kind, match=says):  # the typed error, where the value is read
    loop.train_and_evaluate(config, str(tmp_path / 'direct'))
  assert main.run(config, str(tmp_path / 'run')) == errors.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and says in err and '\n' not in err, err
  assert not (tmp_path / 'run').exists()  # nothing written before the error


def test_every_typed_error_is_an_input_error():
  kinds = [
    registry.PlanError,
    sources.DatasetError,
    checkpoint.MismatchError,
    checkpoint.NonFiniteError,
    storage.UnsupportedPath,
    workdir.ConfigChanged,
    workdir.RunError,
    errors.ConfigError,
  ]
  assert all(issubclass(k, errors.InputError) for k in kinds)


def test_a_misplaced_override_names_the_field_that_exists(capsys):
  argv = ['main', '--config=configs/default.py:runlocal', '--config.eval_split=test']
  with pytest.raises(errors.ConfigError) as e:
    main.cli.check_overrides(argv)
  assert str(e.value) == (
    "--config.eval_split: the config has no field 'eval_split'; did you mean "
    '--config.dataset.eval_split?'
  )
  argv[-1] = '--config.optimizer.learing_rate=0.1'
  with pytest.raises(errors.ConfigError, match=r'did you mean --config.optimizer.learning_rate'):
    main.cli.check_overrides(argv)


@pytest.mark.slow
def test_a_value_error_inside_the_model_keeps_its_traceback(tmp_path):
  """A programming error (here a ValueError raised by the model's forward pass) is not a bad
  config: it exits 1 with its traceback, not as a one-line `error:`."""
  program = (
    'import sys\n'
    'from ftlab.models import vgg\n'
    'def broken(self, *args, **kwargs):\n'
    "  raise ValueError('boom inside the model')\n"
    'vgg.VGG.__call__ = broken\n'
    'from absl import app\n'
    'from ftlab import main\n'
    'sys.argv[0] = "ftlab.main"\n'
    'app.run(main.main, flags_parser=main.parse_flags)\n'
  )
  out = subprocess.run(
    [
      sys.executable,
      '-c',
      program,
      '--config=configs/default.py:runlocal',
      f'--workdir={tmp_path / "run"}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 1, out.stderr[-2000:]
  assert 'Traceback' in out.stderr and 'ValueError: boom inside the model' in out.stderr
  assert 'error: ' not in out.stderr.splitlines()[-1]
