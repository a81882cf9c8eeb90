"""Multi-stage plans in the run loop: the trainable set at each step, one compile per stage,
resume mid-stage and at a boundary, and per-element plans end to end."""

import json
import os
import shutil

import numpy as np
import pytest

from ftlab import loop, paths, train
from ftlab.files import checkpoint
from tests.run_files import params_of, stepwise_config

# End to end: runs of the loop (the `not slow` tier skips them).
pytestmark = pytest.mark.slow

GRADUAL = 'gradual_unfreezing(stage_steps=2)'


def config_for(policy, steps=8):
  config = stepwise_config(policy, steps)
  config.optimizer.weight_decay = 0.0  # a frozen leaf must not move for any reason
  return config


def layers_changed(workdir, step):
  before, after = params_of(workdir, step=step - 1), params_of(workdir, step=step)
  return sorted({p.split('/')[0] for p in before if before[p].tobytes() != after[p].tobytes()})


@pytest.fixture(scope='module')
def gradual_run(tmp_path_factory):
  """An uninterrupted 8-step gradual-unfreezing run with a checkpoint at every step."""
  workdir = str(tmp_path_factory.mktemp('gradual'))
  traces = []
  original = train.train_step

  def counting_step(*args, **kwargs):
    traces.append(kwargs['trainable_mask'])
    return original(*args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'train_step', counting_step)
    summary = loop.train_and_evaluate(config_for(GRADUAL), workdir)
  return workdir, summary, traces


def test_gradual_unfreezing_trains_what_each_stage_says(gradual_run):
  workdir, summary, traces = gradual_run
  # VGG11 (mlp head): the head, then block5, then block4 too, then block3 too.
  head = ['fc', 'predictions']
  block = lambda b: [f'block{b}_conv1', f'block{b}_conv2'] if b > 2 else [f'block{b}_conv1']
  expected = {
    1: head,
    2: head,
    3: block(5) + head,
    4: block(5) + head,
    5: block(4) + block(5) + head,
    6: block(4) + block(5) + head,
    7: block(3) + block(4) + block(5) + head,
    8: block(3) + block(4) + block(5) + head,
  }
  for step in range(2, 9):  # step 1 has no earlier checkpoint to compare with
    assert layers_changed(workdir, step) == sorted(expected[step]), step
  assert [s['first_step'] for s in summary['stages']] == [1, 3, 5, 7]
  assert summary['plan'] == GRADUAL
  plan_txt = open(os.path.join(workdir, 'plan.txt')).read()
  assert plan_txt.count('plan: gradual_unfreezing') == 4
  # One compile per stage: four traces of the step, each with its stage's mask.
  assert len(traces) == 4
  assert [sum(paths.flatten(m).values()) for m in traces] == [4, 8, 12, 16]


@pytest.mark.parametrize('resume_at', [3, 4])  # mid-stage; at a stage boundary
def test_resume_in_a_schedule_is_bit_identical(gradual_run, tmp_path, resume_at):
  workdir, summary, _ = gradual_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  os.remove(os.path.join(resumed, 'summary.json'))
  ckpt_dir = os.path.join(resumed, 'checkpoints')
  for step in checkpoint.all_steps(ckpt_dir):
    if step > resume_at:
      shutil.rmtree(os.path.join(ckpt_dir, str(step)))
  again = loop.train_and_evaluate(config_for(GRADUAL), resumed)
  a, b = params_of(workdir), params_of(resumed)
  for p in a:
    assert a[p].tobytes() == b[p].tobytes(), p
  assert again['final_eval_accuracy'] == summary['final_eval_accuracy']
  assert again['frozen_checksum'] == summary['frozen_checksum']


def test_lp_ft_probes_then_trains_everything(tmp_path):
  workdir = str(tmp_path)
  config = config_for('lp_ft(probe_steps=3)', steps=5)
  summary = loop.train_and_evaluate(config, workdir)
  assert layers_changed(workdir, 3) == ['fc', 'predictions']
  assert len(layers_changed(workdir, 5)) == 10  # every conv layer and the head
  assert summary['trainable_percent'] == 100.0
  stages = summary['stages']
  assert [(s['first_step'], s['last_step']) for s in stages] == [(1, 3), (4, 5)]
  assert stages[0]['train_step_flops'] < 0.5 * stages[1]['train_step_flops']
  # Measured after the fact (a run that did not record them): the last stage's step, the one
  # the summary reports, to the byte; not the probe's.
  measured = loop.step_costs(config)
  assert (
    measured['train_step_flops'] == summary['train_step_flops'] == stages[1]['train_step_flops']
  )
  assert measured['train_step_memory'] == summary['train_step_memory']
  assert measured['train_step_memory'] != stages[0]['train_step_memory']


def test_sparse_plan_end_to_end_keeps_masked_entries(tmp_path):
  workdir = str(tmp_path)
  config = config_for('fisher(0.05, num_batches=2) | bitfit', steps=4)
  config.optimizer.name = 'adamw'
  config.optimizer.weight_decay = 0.1
  summary = loop.train_and_evaluate(config, workdir)
  initial = params_of(workdir, step=1)  # not the init: compare step 1 with the last step
  final = params_of(workdir)
  moved = sum(int((initial[p] != final[p]).sum()) for p in final)
  plan_txt = open(os.path.join(workdir, 'plan.txt')).read()
  assert 'optimizer state is dense' in plan_txt
  assert 0 < moved <= summary['trainable_parameters']
  assert summary['trainable_percent'] < 20
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['train_step_flops'] > 0
  # Every bias trains (bitfit), whatever its Fisher score.
  assert all(np.any(initial[p] != final[p]) for p in final if p.endswith('conv1/bias'))
