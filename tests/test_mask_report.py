"""Mask report figures and Jaccard overlaps against plain numpy, and masked deltas: a bit-exact
round trip through the file, entries stored sparse or dense by size, another base refused."""

import json
import os

import numpy as np
import pytest

from ftlab.analysis import mask_report, masked_delta
from ftlab.files import workdir


def tiny_weights(seed=0):
  """Two layers of three leaves, a sparse change in one, a dense change in the other."""
  rng = np.random.default_rng(seed)
  initial = {
    'conv1/bias': rng.normal(size=(4,)).astype(np.float32),
    'conv1/kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
    'head/kernel': rng.normal(size=(4, 3)).astype(np.float32),
  }
  trained = {p: rng.random(x.shape) < 0.2 for p, x in initial.items()}
  trained['head/kernel'][:] = True
  final = {
    p: np.where(trained[p], x + rng.normal(size=x.shape).astype(np.float32), x)
    for p, x in initial.items()
  }
  return initial, final, trained


def test_layer_report_matches_numpy():
  initial, final, trained = tiny_weights()
  trained['conv1/kernel'].flat[0] = True  # trained but unchanged: counts as trained only
  final['conv1/kernel'].flat[0] = initial['conv1/kernel'].flat[0]
  report = mask_report.layer_report(initial, final, trained)
  budget = sum(int(t.sum()) for t in trained.values())
  for row in report['layers']:
    leaves = [p for p in initial if p.startswith(row['layer'] + '/')]
    x0 = np.concatenate([initial[p].ravel() for p in leaves]).astype(np.float64)
    x1 = np.concatenate([final[p].ravel() for p in leaves]).astype(np.float64)
    t = np.concatenate([trained[p].ravel() for p in leaves])
    assert row['entries'] == x0.size
    assert row['trained'] == t.sum()
    assert row['trained_fraction'] == pytest.approx(t.mean())
    assert row['budget_share'] == pytest.approx(t.sum() / budget)
    assert row['changed'] == np.count_nonzero(x0 != x1)
    assert row['delta_norm'] == pytest.approx(np.linalg.norm(x1 - x0), rel=1e-12)
    assert row['relative_delta'] == pytest.approx(np.linalg.norm(x1 - x0) / np.linalg.norm(x0))
  assert [r['layer'] for r in report['layers']] == ['conv1', 'head']
  assert report['total']['trained'] == budget
  assert sum(r['budget_share'] for r in report['layers']) == pytest.approx(1.0)


def test_jaccard_matrix_matches_sets():
  rng = np.random.default_rng(3)
  masks = {n: {'a': rng.random((5, 6)) < 0.3, 'b': rng.random(7) < 0.5} for n in 'xyz'}

  def as_set(m):
    return {('a', i) for i in np.flatnonzero(m['a'])} | {('b', i) for i in np.flatnonzero(m['b'])}

  matrix = mask_report.jaccard_matrix(masks)
  for i, a in enumerate('xyz'):
    for j, b in enumerate('xyz'):
      sa, sb = as_set(masks[a]), as_set(masks[b])
      assert matrix[i, j] == pytest.approx(len(sa & sb) / len(sa | sb))
  with pytest.raises(ValueError, match='different parameters'):
    mask_report.jaccard(masks['x'], {'a': masks['y']['a']})


def test_masked_delta_round_trip_is_bit_exact(tmp_path):
  initial, final, _ = tiny_weights()
  final['conv1/bias'][0] = -0.0 if initial['conv1/bias'][0] == 0 else final['conv1/bias'][0]
  initial['conv1/bias'][1], final['conv1/bias'][1] = 0.0, -0.0  # equal as floats, not as bits
  delta = masked_delta.make(initial, final, run='tiny')
  path = str(tmp_path / 'delta.npz')
  size = masked_delta.save(path, delta)
  assert size == len(masked_delta.serialize(delta)) == os.path.getsize(path)  # the study's column
  with np.load(path) as data:  # the header as UTF-8 bytes, readable with numpy and json alone
    assert json.loads(data['__header__'].tobytes().decode()) == delta['header']
  old = tmp_path / 'old.npz'  # files written with the header as a 0-d string still load
  np.savez(old, __header__=np.array(json.dumps(delta['header'])), **delta['arrays'])
  assert masked_delta.load(str(old))['header'] == delta['header']
  loaded = masked_delta.load(path)
  rebuilt = masked_delta.apply(initial, loaded)
  for p in final:
    assert rebuilt[p].tobytes() == final[p].tobytes(), p
  leaves = loaded['header']['leaves']
  assert leaves['head/kernel']['storage'] == 'dense'  # every entry changed: smaller whole
  assert leaves['conv1/kernel']['storage'] == 'sparse'
  changed = sum(
    int(np.count_nonzero(initial[p].view(np.uint32) != final[p].view(np.uint32))) for p in initial
  )
  assert loaded['header']['changed'] == changed
  np.testing.assert_array_equal(
    loaded['arrays']['conv1/kernel::indices'],
    np.flatnonzero(initial['conv1/kernel'].ravel() != final['conv1/kernel'].ravel()),
  )


def test_masked_delta_refuses_another_base_and_other_files(tmp_path):
  initial, final, _ = tiny_weights()
  delta = masked_delta.make(initial, final, base='tiny base')
  other = {p: x.copy() for p, x in initial.items()}
  other['conv1/bias'][0] += 1
  with pytest.raises(masked_delta.DeltaError, match='this delta applies to sha256:.*tiny base'):
    masked_delta.apply(other, delta)
  np.savez(tmp_path / 'x.npz', a=np.zeros(3))
  with pytest.raises(masked_delta.DeltaError, match='not a masked delta'):
    masked_delta.load(str(tmp_path / 'x.npz'))


def test_the_script_names_a_runs_plan_in_each_layout():
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'scripts', 'mask_report.py')
  spec = importlib.util.spec_from_file_location('mask_report_script', path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  base = '/w/runs/fashion_mnist'  # scripts/study.py: <plan>/lr<lr>/seed<k>
  assert script.label(f'{base}/rigl/lr0.003/seed1', base) == ('rigl_lr0.003', 'rigl/lr0.003/seed1')
  assert script.label('/w/10shot/rigl_lr0.003/seed0', '/w') == (
    'rigl_lr0.003',
    '10shot/rigl_lr0.003/seed0',
  )
  assert script.label('/w/rigl-lr0.01-seed2', '/w')[0] == 'rigl-lr0.01'  # a sweep's run


@pytest.mark.parametrize(
  'path, name',
  [
    ('workdirs/demo/full', 'full'),
    ('workdirs/demo/full/checkpoints/', 'full'),
    ('gs://b/full', 'full'),
    ('workdirs/demo/runs/fashion_mnist_5_9/full/lr0.02/seed0', 'full_lr0.02_seed0'),
    ('w/runs/t/lora/lr1e-05/seed3/checkpoints', 'lora_lr1e-05_seed3'),
    ('w/seed0', 'seed0'),  # not a study's layout
  ],
)
def test_run_names_keep_a_study_runs_plan_rate_and_seed(path, name):
  """The name combine.py and the mask report give a run: a study's runs would all be `seed0`."""
  assert workdir.run_name(path) == name
