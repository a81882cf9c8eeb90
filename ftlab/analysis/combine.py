"""Output ensembles, model soups and WiSE-FT over fine-tuned checkpoints.

Ways to combine runs of one architecture (same model, head and label space):

- output ensembles: every run's model sees the same batch, and their logits (`logits`) or
  probabilities (`probs`) are averaged;
- soups: one model whose parameters are the mean of the runs' (`uniform_soup`), or of a
  greedily chosen subset (`greedy_soup`, Wortsman et al. 2022: runs tried in order of their own
  held-out accuracy, each kept only if the soup's held-out accuracy does not drop);
- WiSE-FT (Wortsman et al., CVPR 2022): `theta(alpha) = (1 - alpha) theta0 + alpha theta1`
  between two runs (`wise`), over a list of alphas.

Every model is scored with the run loop's exact eval (`ftlab.analysis.ensemble.ExactEval`:
padded, masked batches, sums over devices). Averaged weights (`ftlab.analysis.soups`, exact for
equal inputs) make BatchNorm's running statistics stale, so in a BN model a parameter average
gets fresh statistics from K training batches (`reset_batch_stats`), unless its parameters are
bit-identical to one run's (a soup of copies, a WiSE endpoint); an output ensemble of copies of
one model is that model.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftlab import init_from, parallel, run
from ftlab.analysis import soups
from ftlab.analysis.ensemble import OUTPUT_ENSEMBLES, ExactEval, replayable
from ftlab.data import input_pipeline
from ftlab.errors import InputError
from ftlab.files import checkpoint, storage
from ftlab.files import workdir as workdir_

PyTree = Any

METHODS = ('logits', 'probs', 'uniform_soup', 'greedy_soup', 'wise')
# Fields the eval data must share with the runs, so that eval inputs look like training ones.
# The eval dataset itself may differ (a shifted test set with the same labels, say).
EVAL_FIELDS = ('dataset.image_size', 'dataset.preprocess')
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BN_RESET_BATCHES = 50
LABELS = {
  'logits': 'logit ensemble',
  'probs': 'probability ensemble',
  'uniform_soup': 'uniform soup',
  'greedy_soup': 'greedy soup',
}


class CombineError(InputError):
  """Runs, methods or eval data that cannot be combined as asked, in one line."""


# --- The runs' configs. ----------------------------------------------------------------------


def check_eval_data(config: Any, architecture: Mapping[str, Any]) -> None:
  """Raises CombineError unless the eval data's `dataset.image_size` and `dataset.preprocess`
  (in a config, or a dict of those) are the runs'."""
  config = workdir_.plain(config)
  bad = [
    f'{f} is {json.dumps(workdir_.config_field(config, f))} in --config but '
    f'{json.dumps(architecture[f])} in the runs'
    for f in EVAL_FIELDS
    if workdir_.config_field(config, f) != architecture[f]
  ]
  if bad:
    raise CombineError(f'the eval data does not match the runs: {"; ".join(bad)}')


def check_methods(methods: Sequence[str], num_runs: int, alphas: Sequence[float]) -> None:
  """Raises CombineError for an unknown method, WiSE without exactly two runs, or a bad alpha."""
  unknown = [m for m in methods if m not in METHODS]
  if not methods:
    raise CombineError(f'no method given; valid: {", ".join(METHODS)}')
  if unknown:
    raise CombineError(f'unknown methods {unknown}; valid: {", ".join(METHODS)}')
  if num_runs < 1:
    raise CombineError('no checkpoints to combine')
  if 'wise' in methods and num_runs != 2:
    raise CombineError(f'wise interpolates two runs (theta0, theta1); got {num_runs}')
  if 'wise' in methods and not (alphas and all(np.isfinite(a) for a in alphas)):
    raise CombineError(f'wise needs finite alphas; got {list(alphas)}')


def combine(
  data: input_pipeline.Data,
  spread: parallel.Spread,
  paths: Sequence[str],
  methods: Sequence[str],
  *,
  alphas: Sequence[float] = DEFAULT_ALPHAS,
  bn_reset_batches: int = DEFAULT_BN_RESET_BATCHES,
  workdir: str | None = None,
) -> dict:
  """Evaluates runs and their ensembles, soups or WiSE-FT interpolations.

  Args:
    data: the eval data (`run.make_data` of an eval config): its `eval` split, held-out split
      (`minival`, else `eval`), training split (statistics reset), batch sizes and image
      preparation. The model is read from the runs.
    spread: how the eval steps run over the devices (a multi-process job joined already).
    paths: run workdirs or their `checkpoints/` directories; the newest step of each is used.
    methods: some of `METHODS`.
    alphas: WiSE-FT coefficients (`wise` only): 0 is `paths[0]`, 1 is `paths[1]`.
    bn_reset_batches: training batches for fresh BatchNorm statistics of parameter averages
      (BN models only; 0 keeps the averaged running statistics).
    workdir: if given, `combine.json` is written there (process 0); a local path or a URL.

  Returns:
    The dict written to `combine.json`: the runs, one result per model, and notes.

  Raises:
    ValueError: unknown method, runs of different architectures or heads, eval data that do
      not fit them, or a run's checkpoint that does not fit its config; a
      `storage.UnsupportedPath` for a URL `workdir` or path of another scheme.
    FileNotFoundError: a path without a complete checkpoint.
  """
  if workdir:
    storage.check(workdir, 'workdir')
  # Duplicates dropped, order kept: the results come out in the order asked.
  methods = list(dict.fromkeys(methods))
  alphas = [float(a) for a in alphas]
  check_methods(methods, len(paths), alphas)
  names = workdir_.unique_names(paths)
  runs = {n: workdir_.read_run(p) for n, p in zip(names, paths)}
  architecture = workdir_.check_compatible({n: r['config'] for n, r in runs.items()})
  eval_fields = {'dataset': {'image_size': data.image_size, 'preprocess': data.preprocess}}
  check_eval_data(eval_fields, architecture)
  parallel.check_divisible(data.eval_batch, spread.num_devices)
  model, variables = _load_runs(runs, architecture, data)
  batch_norm = 'batch_stats' in variables[names[0]]
  averaging = any(m in ('uniform_soup', 'greedy_soup', 'wise') for m in methods)
  reset_batches = bn_reset_batches if batch_norm and averaging else 0
  if reset_batches:
    parallel.check_divisible(data.order.global_batch, spread.num_devices)
  # Every model and soup reads the same eval batches again: read once (`replayable`).
  eval_batches = {
    name: replayable(
      functools.partial(data.eval_batches, name),
      input_pipeline.num_eval_steps(split.num_examples, data.eval_batch),
    )
    for name, split in data.evals.items()
  }
  # From step 0, augmented as the eval config says: the same batches for every soup, so
  # their statistics differ only by their weights.
  train_batches = functools.partial(data.train_batches, 0)
  train_batches = replayable(train_batches, int(reset_batches)) if reset_batches else None
  scorer = ExactEval(model, spread, eval_batches, train_batches, data.image_size)
  results = _results(scorer, variables, runs, methods, alphas, data.held_out, reset_batches)
  notes = _notes(data, runs, methods, batch_norm, bn_reset_batches)
  output = {
    'methods': methods,
    'runs': {
      n: {'directory': r['directory'], 'step': r['step'], 'plan': r['plan']}
      for n, r in runs.items()
    },
    'architecture': architecture,
    'eval': {
      'dataset': data.dataset,
      'classes': list(data.evals['eval'].classes),
      'eval_split': data.evals['eval'].spec,
      'held_out_split': data.held_out,
      'held_out_is_eval_split': data.held_out == 'eval',
    },
    'batch_norm': batch_norm,
    'bn_reset_batches': bn_reset_batches if batch_norm else 0,
    'bn_reset_applied': any(r['bn_reset_applied'] for r in results),
    'results': results,
    'notes': notes,
  }
  if workdir and jax.process_index() == 0:
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    (storage.path(workdir) / 'combine.json').write_text(
      json.dumps(output, indent=2, ensure_ascii=False)
    )
  return output


def _results(scorer, variables, runs, methods, alphas, held_out, reset_batches) -> list:
  """One result per run, then per method: scores on `eval` (and the held-out split), the
  members, and whether BatchNorm statistics were recomputed for averaged weights."""
  names = list(runs)
  splits = ['eval'] + (['minival'] if held_out == 'minival' else [])

  def result(method, name, members, evaluate_fn, reset=False, **extra):
    scores = {s: evaluate_fn(s) for s in splits}
    return dict(
      method=method, name=name, members=members, **extra, bn_reset_applied=reset, **scores
    )

  results = [
    result(
      'run',
      name,
      [name],
      functools.partial(scorer.evaluate, variables[name]),
      plan=runs[name]['plan'],
      step=runs[name]['step'],
    )
    for name in names
  ]
  member_scores = {r['name']: r[held_out]['accuracy'] for r in results}

  def average(members, weights_fn):
    """The averaged variables and whether their BN statistics were recomputed."""
    mixed = weights_fn([variables[n] for n in members])
    # An average equal to one run bit for bit is that run: it keeps its stored statistics,
    # which a reset from K batches would only approximate.
    same_as_a_run = any(
      soups.trees_identical(mixed['params'], variables[n]['params']) for n in names
    )
    if reset_batches and not same_as_a_run:
      return scorer.reset_batch_stats(mixed), True
    return mixed, False

  for method in methods:
    if method in OUTPUT_ENSEMBLES:
      members = [variables[n] for n in names]
      # `result` calls it at once, so the loop variables are read while they hold this method.
      evaluate_fn = lambda s: scorer.evaluate_ensemble(members, method, s)
      results.append(result(method, LABELS[method], list(names), evaluate_fn))
    elif method == 'uniform_soup':
      soup, reset = average(names, soups.mean_tree)
      evaluate_fn = functools.partial(scorer.evaluate, soup)
      results.append(result(method, LABELS[method], list(names), evaluate_fn, reset))
    elif method == 'greedy_soup':
      # Ranked by their own held-out accuracy; sorted() is stable, so ties keep the given order.
      ranked = sorted(names, key=lambda n: -member_scores[n])
      made = {}

      # Every trial soup is kept with its reset flag, so the chosen soup's flag is known without
      # averaging it again.
      def make_soup(members):
        made[tuple(members)] = average(members, soups.mean_tree)
        return made[tuple(members)][0]

      chosen, soup, trials = soups.greedy_soup(
        ranked, make_soup, lambda v: scorer.evaluate(v, held_out)['accuracy']
      )
      evaluate_fn = functools.partial(scorer.evaluate, soup)
      reset = made[tuple(chosen)][1]
      results.append(result(method, LABELS[method], chosen, evaluate_fn, reset, trials=trials))
    else:  # wise
      for alpha in alphas:
        # `a=alpha` binds this alpha into the lambda, whenever it is called.
        mixed, reset = average(names, lambda vs, a=alpha: soups.interpolate(vs[0], vs[1], a))
        evaluate_fn = functools.partial(scorer.evaluate, mixed)
        name = f'WiSE-FT α={alpha:g}'
        results.append(result(method, name, list(names), evaluate_fn, reset, alpha=alpha))

  return results


def _load_runs(runs: Mapping[str, dict], architecture: Mapping[str, Any], data) -> tuple:
  """The runs' shared model and each run's variables, strictly checked against it."""
  model_cfg = dict(next(iter(runs.values()))['config']['model'])
  # The shared values, defaults filled in (`workdir.RUN_FIELDS`): a run older than a field
  # lacks it in its own config.
  model_cfg.update(adaptive_pool=architecture['model.adaptive_pool'])
  model_cfg.update(dtype=architecture['model.dtype'])
  model = run.build_model(ml_collections.ConfigDict(model_cfg), data.train.num_classes)
  size = data.image_size
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
  )
  variables = {}
  for name, found in runs.items():
    try:
      # `init_from.load_params`: a tuned run's adapters are folded in, so every run is scored
      # as the plain VGG the others are.
      variables[name] = {
        key: init_from.load_params(found['directory'], shapes[key], key=key) for key in shapes
      }
    except checkpoint.MismatchError as e:
      raise CombineError(
        f'run {name} does not fit its model on the eval data '
        f'({data.train.num_classes} classes): {e}'
      ) from None
  return model, variables


def _notes(data, runs, methods, batch_norm, bn_reset_batches) -> list[str]:
  """What a reader of the results must know: an optimistic greedy soup, how BatchNorm
  statistics of averages were made, runs that start from different weights."""
  held_out = data.held_out
  averaging = any(m in ('uniform_soup', 'greedy_soup', 'wise') for m in methods)
  notes = []
  if 'greedy_soup' in methods and held_out == 'eval':
    notes.append(
      f'The greedy soup ranked and accepted runs on the eval split ({data.evals["eval"].spec}): '
      'the config has no dataset.minival, so its reported accuracy is optimistic.'
    )
  if averaging and batch_norm:
    if bn_reset_batches:
      notes.append(
        f'BatchNorm statistics of averaged weights were recomputed from {bn_reset_batches} '
        f'training batches of {data.order.global_batch} ({data.train.spec}, augment '
        f'{data.augment}); averages equal to one run keep its stored statistics.'
      )
    else:
      notes.append(
        'BatchNorm statistics of averaged weights were averaged too, not recomputed '
        '(bn_reset_batches=0): they do not match the averaged weights.'
      )
  starts = {n: workdir_.config_field(r['config'], 'init.checkpoint', '') for n, r in runs.items()}
  if averaging and len(set(starts.values())) > 1:
    described = ', '.join(f'{n}: {s or "random init"}' for n, s in starts.items())
    notes.append(
      f'The runs start from different weights ({described}). Averaging the weights of networks '
      'trained from different starts is not expected to work (their units are not aligned), so '
      'soups mixing them fall apart; output ensembles do not have this problem.'
    )
  return notes
