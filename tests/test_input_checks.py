"""Values checked for sense, failures named, provenance kept (the edges public bug reports found:
a negative learning rate that trained by ascent, an empty split found after training, a few-shot
budget larger than a class, a checkpoint of an older ftlab called damaged, a full disk).

Each check is one line naming the field, the value and what would be valid, before anything is
computed or written; small generated inputs (a tiny image folder, toy checkpoints).
"""

import os
import subprocess
import sys

import flax
import numpy as np
import optax
import pytest
import tensorflow as tf
from ml_collections import ConfigDict

from configs import default
from ftlab import errors, loop, main, run, train
from ftlab.data import datasets, sources
from ftlab.files import checkpoint, workdir
from ftlab.plans import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_folder(root, per_class, classes=('cat', 'dog'), splits=('train', 'test')):
  """root/<split>/<class>/<i>.png: `per_class[split]` solid 8 px images per class."""
  for split in splits:
    for c, label in enumerate(classes):
      os.makedirs(root / split / label, exist_ok=True)
      for i in range(per_class[split]):
        image = np.full((8, 8, 3), 40 + 150 * c + i, np.uint8)
        tf.io.write_file(str(root / split / label / f'{i}.png'), tf.io.encode_png(image))
  return f'image_folder:{root}'


def folder_config(name, steps=2):
  config = default.get_config('runlocal')
  config.dataset.name, config.dataset.train_split, config.dataset.eval_split = name, 'train', 'test'
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = config.log_every_steps = config.eval_every_steps = steps
  config.checkpoint_every_steps, config.record_step_flops = steps, False
  return config


def one_line_exit_2(config, workdir_, capsys, *says):
  assert main.run(config, str(workdir_)) == errors.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert '\n' not in err and err.startswith('error: '), err
  assert all(s in err for s in says), err
  assert not os.path.exists(workdir_)  # refused before anything was written


# --- Values checked for sense. --------------------------------------------------------------


@pytest.mark.parametrize(
  'field, value, says',
  [
    ('learning_rate', -0.01, 'optimizer.learning_rate=-0.01 is not a number >= 0'),
    ('learning_rate', float('nan'), 'optimizer.learning_rate=nan'),
    ('weight_decay', -0.1, 'optimizer.weight_decay=-0.1 is not a number >= 0'),
    ('momentum', 1.0, 'optimizer.momentum=1.0 is not a number in [0, 1)'),
    ('grad_clip_norm', -1.0, 'optimizer.grad_clip_norm=-1.0'),
    ('warmup_steps', -3, 'optimizer.warmup_steps=-3'),
  ],
)
def test_sgd_values_are_refused_by_name(field, value, says):
  cfg = ConfigDict(dict(name='sgd', learning_rate=0.1, momentum=0.9, schedule='constant'))
  cfg[field] = value
  with pytest.raises(errors.ConfigError) as e:
    optim.check(cfg, 10)
  assert says in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('field, value', [('b1', 1.0), ('b2', -0.1), ('eps', 0.0)])
def test_adam_values_are_refused_by_name(field, value):
  cfg = ConfigDict(dict(name='adam', learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8))
  cfg[field] = value
  with pytest.raises(errors.ConfigError, match=rf'optimizer\.{field}={value!r} is not'):
    optim.check(cfg, 10)


def test_a_warmup_longer_than_the_run_is_a_warning_not_an_error():
  cfg = ConfigDict(dict(name='adam', learning_rate=1e-2, warmup_steps=100, schedule='constant'))
  (warning,) = optim.check(cfg, 2)
  assert 'optimizer.warmup_steps=100 >= num_train_steps=2' in warning
  assert 'never reaches its peak 0.01' in warning
  assert optim.check(ConfigDict(dict(name='adam', learning_rate=1e-2, warmup_steps=1)), 2) == []


def test_a_zero_learning_rate_is_a_warning_not_an_error():
  # torch.optim also takes lr=0; a run at lr 0 evaluates its starting weights.
  (warning,) = optim.check(ConfigDict(dict(name='sgd', learning_rate=0.0)), 10)
  assert warning.startswith('optimizer.learning_rate=0: no parameter changes')


@pytest.mark.parametrize(
  'field, value, says',
  [
    ('num_train_steps', -5, 'num_train_steps=-5 is not a whole number >= 0'),
    ('batch_size', 0, 'batch_size=0'),
    ('eval_every_steps', 0, 'eval_every_steps=0'),
    ('keep_checkpoints', 0, 'keep_checkpoints=0'),
    ('label_smoothing', 1.0, 'label_smoothing=1.0 is not a number in [0, 1)'),
    ('early_stopping_patience', -1, 'early_stopping_patience=-1'),
  ],
)
def test_run_values_are_refused_by_name(field, value, says):
  config = default.get_config('runlocal')
  config[field] = value
  with pytest.raises(errors.ConfigError) as e:
    run.check_values(config)
  assert says in str(e.value)


def test_zero_steps_evaluate_the_starting_weights_with_a_warning(tmp_path):
  # A 0-step run is how a checkpoint is evaluated under a new config (`init.checkpoint=RUN`).
  config = folder_config(image_folder(tmp_path / 'data', {'train': 4, 'test': 2}))
  config.num_train_steps = 0
  summary = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 0 and summary['eval_examples'] == 4
  assert summary['warnings'][0].startswith('num_train_steps=0: nothing trains')


def test_warnings_are_said_once_and_kept_in_the_record(tmp_path, caplog):
  config = default.get_config('runlocal')
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.log_every_steps, config.record_step_flops = 2, False
  config.optimizer.warmup_steps = 5
  summary = loop.train_and_evaluate(config, str(tmp_path))
  said = [r for r in caplog.records if 'optimizer.warmup_steps=5' in r.getMessage()]
  assert len(said) == 1 and said[0].levelname == 'WARNING'
  assert summary['warnings'] == [said[0].getMessage()]
  record = (tmp_path / 'launches.jsonl').read_text()
  assert 'optimizer.warmup_steps=5' in record and 'ftlab_version' in record


@pytest.mark.parametrize('holdout', ['0', '-5', '0%', '100%', '1O', '150%'])
def test_a_minival_of_nothing_or_everything_is_refused(holdout):
  with pytest.raises(
    sources.DatasetError, match=r'dataset\.minival=.* is not a number of examples'
  ):
    datasets.minival_split('train', holdout)
  assert datasets.minival_split('train', '10%') == ('train[:-10%]', 'train[-10%:]')


def test_empty_splits_are_refused_by_the_field_that_chose_them(tmp_path, capsys):
  name = image_folder(tmp_path / 'data', {'train': 8, 'test': 4})
  config = folder_config(name)
  config.dataset.train_split = 'train[:2%]'
  one_line_exit_2(config, tmp_path / 'a', capsys, "dataset.train_split: 'train[:2%]' selects no")
  config = folder_config(name)
  config.dataset.eval_split = 'test[:1%]'
  one_line_exit_2(config, tmp_path / 'b', capsys, "dataset.eval_split: 'test[:1%]' selects no")


def test_a_budget_larger_than_a_class_names_the_setting_and_the_class(tmp_path, capsys):
  name = image_folder(tmp_path / 'data', {'train': 3, 'test': 2})
  config = folder_config(name)
  config.dataset.examples_per_class = 5
  one_line_exit_2(
    config, tmp_path / 'a', capsys, 'dataset.examples_per_class=5', "class 'cat' has 3 examples"
  )
  config = folder_config(name)
  config.evals.fewshot.shots = (1, 4)
  one_line_exit_2(config, tmp_path / 'b', capsys, 'evals.fewshot.shots=4', "class 'cat'")


# --- Failures of the environment named. -----------------------------------------------------


@flax.struct.dataclass
class StateBeforeEma:
  """`TrainState` as ftlab wrote it before the moving average existed."""

  step: object
  params: object
  batch_stats: object
  opt_state: object


def toy_state(cls=train.TrainState, step=3):
  params = {'w': np.arange(4, dtype=np.float32)}
  return cls(np.int32(step), params, {}, (optax.EmptyState(), {'mu': np.ones(4, np.float32)}))


def test_a_checkpoint_of_an_older_train_state_resumes_with_what_it_lacks_empty(tmp_path):
  checkpoint.save(tmp_path, 3, toy_state(StateBeforeEma), {'plan': 'x'})
  target = toy_state(step=0)
  state, meta = checkpoint.restore(tmp_path, target)
  assert isinstance(state, train.TrainState) and int(state.step) == 3 and state.ema == {}
  np.testing.assert_array_equal(state.params['w'], np.arange(4))
  # What it lacks and the target holds arrays for is a mismatch, named, not damage.
  with pytest.raises(checkpoint.MismatchError, match='missing .*ema/w'):
    checkpoint.restore(tmp_path, target.replace(ema={'w': np.zeros(4, np.float32)}))


def test_a_write_that_fails_is_one_line_and_the_step_before_stays(tmp_path, monkeypatch):
  checkpoint.save(tmp_path, 1, toy_state(), {'plan': 'x'})

  def full(self, *args, **kwargs):
    raise ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: Failed to write 16 '
      "bytes to file 14: No space left on device [os_error_code='28']"
    )

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', full)
  with pytest.raises(checkpoint.StorageError) as e:
    checkpoint.save(tmp_path, 2, toy_state(), {'plan': 'x'})
  assert '\n' not in str(e.value)
  assert 'could not be written' in str(e.value) and 'No space left on device' in str(e.value)
  assert 'step 1 is intact' in str(e.value)
  monkeypatch.undo()
  assert checkpoint.all_steps(tmp_path) == [1]
  state, _ = checkpoint.restore(tmp_path, toy_state(step=0))
  assert int(state.step) == 3


def test_a_programming_error_while_saving_keeps_its_traceback(tmp_path, monkeypatch):
  def bug(self, *args, **kwargs):
    raise ValueError('a bug, not the disk')

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', bug)
  with pytest.raises(ValueError, match='a bug, not the disk') as e:
    checkpoint.save(tmp_path, 1, toy_state(), {'plan': 'x'})
  assert not isinstance(e.value, errors.InputError)


def test_a_checkpoint_path_orbax_cannot_read_back_is_found_when_written(tmp_path):
  with pytest.raises(checkpoint.StorageError, match=r"holds '\['"):
    workdir.Workdir(str(tmp_path / 'runs[1]'))
  # Below the workdir check too: a step written where it cannot be read is found at once.
  with pytest.raises(checkpoint.StorageError, match='cannot be read back'):
    checkpoint.save(tmp_path / 'odd[dir]', 1, toy_state(), {'plan': 'x'})


@pytest.mark.slow
def test_multi_host_without_a_cluster_is_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'FTLAB_'))}
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'ftlab.main',
      '--config=configs/default.py:runlocal',
      f'--workdir={tmp_path / "run"}',
      '--config.multi_host=True',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith('error: multi_host=True, but this machine')
  assert not (tmp_path / 'run').exists()
