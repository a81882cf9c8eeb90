"""The run assembled once from its config: a frozen description of everything it needs.

`make_run(config, workdir)` is everything `ftlab.loop` needs before its first step, made in
one pass: the model (its convolutions lowered for the backend it runs on), the `Data` read
once, the initial variables (a checkpoint's, strictly checked, with the likely cause and the
flags that fix a mismatch; a tuner's adapters beside the loaded kernels), every stage with its
`(plan, tx)` (per-element masks chosen by the run's score passes, `ftlab.scoring`), the
evaluators (`ftlab.evals`), and the state to start from (fresh, or resumed from the newest
readable checkpoint, a damaged one moved aside). Every config or input problem is a one-line
`InputError` raised where the value is read, before anything is compiled or written; a
programming error keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

import ftlab
from ftlab import activation_cache, ema, errors, evals, init_from, parallel, paths, scoring, train
from ftlab.data import datasets, input_pipeline, preprocessing, sources
from ftlab.files import checkpoint, storage, workdir
from ftlab.models import lowering, vgg
from ftlab.plans import optim, policies, syntax, tuners

PyTree = Any
# Activation dtypes only: parameters stay float32 whatever is chosen (`vgg.VGG.dtype`).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def resolve_conv_lowering(choice: str) -> str:
  """`conv` or `matmul` for `config.model.conv_lowering` on this process's default backend."""
  return lowering.for_backend(choice, jax.default_backend())


def build_model(model_cfg: Any, num_classes: int) -> nn.Module:
  """The VGG that `config.model` describes, with `num_classes` outputs, its convolutions
  lowered for the default backend (`auto`: patch matmuls on CPU).

  Raises:
    ConfigError: an unknown name, head, dtype or lowering.
  """
  if model_cfg.dtype not in DTYPES:
    raise errors.ConfigError(f'model dtype {model_cfg.dtype!r} is not one of {list(DTYPES)}')
  return vgg.by_name(
    model_cfg.name,
    num_classes=num_classes,
    head=model_cfg.head,
    width=float(model_cfg.width),
    dropout_rate=float(model_cfg.dropout_rate),
    adaptive_pool=int(model_cfg.get('adaptive_pool', 0)),
    conv_lowering=resolve_conv_lowering(model_cfg.get('conv_lowering', 'auto')),
    dtype=DTYPES[model_cfg.dtype],
  )


def _dataset_kwargs(config: Any) -> dict:
  ds = config.dataset
  return dict(
    # Empty strings from the config mean "the library's default location", which the dataset
    # builders spell None.
    data_dir=ds.data_dir or None,
    download=ds.download,
    fashion_mnist_dir=ds.local_dir or None,
    classes=tuple(ds.classes),
    seed=config.seed,
    label=ds.get('label', ''),
  )


def make_data(config: Any, preprocess: str | None = None) -> input_pipeline.Data:
  """The run's splits (`eval`, and `minival` carved off the training split if configured),
  their order and image preparation (`preprocess`, default the config's).

  Raises:
    InputError: an unknown preprocessing or augmentation, a dataset that cannot be read
      (`DatasetError`), or a batch order that does not fit the data.
  """
  ds = config.dataset
  if preprocess is None and ds.preprocess == 'auto':  # the init weights' own convention
    preprocess = init_from.preprocessing('auto', init_from.source(config.init))
  preprocess = preprocessing.check(preprocess or ds.preprocess)
  if ds.augment not in input_pipeline.AUGMENTATIONS:
    augmentations = ', '.join(input_pipeline.AUGMENTATIONS)
    raise errors.ConfigError(f'unknown augmentation {ds.augment!r}; valid: {augmentations}')
  common = _dataset_kwargs(config)
  train_split, splits = ds.train_split, {'eval': ds.eval_split}
  # The minival rows come out of the training split (or a split named for it, checked to share
  # no example with training or eval), so the test split stays untouched for the final numbers.
  if ds.minival:
    train_split, splits['minival'] = datasets.minival_split(ds.train_split, ds.minival)
  fields = {'train': 'dataset.train_split', 'eval': 'dataset.eval_split'}
  fields['minival'] = 'dataset.minival'
  for name, split in eval_splits(ds.get('eval_splits', '')).items():
    if name in fields:  # `minival` too when unset: the study and the best step read it
      raise errors.ConfigError(
        f'dataset.eval_splits names {name!r}, the name of {fields[name]}; choose another name'
      )
    if name in evals.base.evaluators():
      # `<name>/...` would mix with the evaluator's own metrics.
      raise errors.ConfigError(
        f'dataset.eval_splits names {name!r}, a name its metrics would share with the '
        f'evaluator {name!r}; choose another name'
      )
    splits[name], fields[name] = split, f'dataset.eval_splits {name}'
  train_data = _build(
    fields['train'], ds.name, train_split, examples_per_class=ds.examples_per_class, **common
  )
  eval_data = {k: _build(fields[k], ds.name, s, **common) for k, s in splits.items()}
  for name, found in [('train', train_data), *eval_data.items()]:
    # An empty split would train on nothing, or evaluate nothing after every step was paid
    # for: refused here, by the field that chose it.
    check_not_empty(found, fields[name], ds.name)
  if 'minival' in eval_data:  # a minival named as a split of its own overlaps neither
    datasets.check_disjoint(train_data, eval_data['minival'], 'dataset.minival')
    datasets.check_disjoint(eval_data['eval'], eval_data['minival'], 'dataset.minival')
  order = input_pipeline.BatchOrder(
    config.batch_size,
    seed=config.seed,
    shuffle_buffer=ds.shuffle_buffer,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    shards=ds.get('shards', 1),
  )
  # More shards than examples leaves a shard empty (`parts` cuts by `array_split`), and an
  # empty shard can fill none of its rows of a global batch; refused at launch.
  if order.shards > train_data.num_examples:
    raise errors.ConfigError(
      f'dataset.shards={order.shards} exceeds the {train_data.num_examples} training examples'
    )
  shards = [j for j, _, _ in order.shard_rows()]
  parts = input_pipeline.parts(train_data.num_examples, order.shards)
  logging.info(
    'process %d of %d reads training shards %s of %d: %d of %d examples',
    order.process_index,
    order.process_count,
    shards,
    order.shards,
    sum(len(parts[j]) for j in shards),
    train_data.num_examples,
  )
  return input_pipeline.Data(
    train_data,
    eval_data,
    order,
    config.eval_batch_size,
    ds.image_size,
    preprocess,
    ds.augment,
    ds.name,
  )


def _build(field: str, name: str, split: str, **kwargs) -> datasets.DataSplit:
  """`datasets.build_dataset`; an error about `split` itself is led by the config field that
  chose it (`dataset.eval_splits v2: 'tset' is no split of ...`), unless it names a field
  already (errors about the dataset, not the split, stay as they are).

  Raises:
    DatasetError: the split cannot be read.
  """
  try:
    return datasets.build_dataset(name, split, **kwargs)
  except sources.DatasetError as e:
    if str(e).startswith('dataset.') or repr(split) not in str(e):
      raise
    raise sources.DatasetError(f'{field}: {e}') from None


def eval_splits(text: str) -> dict[str, str]:
  """`dataset.eval_splits`: more named splits evaluated beside `eval`, `'name=split, ...'`
  (`'v2=test[:50%], val=validation'`), each reported as `<name>/accuracy` and in the summary's
  `final_split_accuracy`.

  Raises:
    ConfigError: an entry that is not `name=split`, a name that is not an identifier, or a
      name given twice; one line.
  """
  found = {}
  for entry in filter(None, (e.strip() for e in str(text or '').split(','))):
    name, sep, split = (x.strip() for x in entry.partition('='))
    if not sep or not name.isidentifier() or not split:
      raise errors.ConfigError(
        f'dataset.eval_splits entry {entry!r} is not name=split with an identifier as the '
        "name (e.g. 'v2=test[:50%], val=validation')"
      )
    if name in found:
      raise errors.ConfigError(f'dataset.eval_splits names {name!r} twice; one split per name')
    found[name] = split
  return found


def check_not_empty(split: datasets.DataSplit, field: str, dataset: str) -> None:
  """Raises DatasetError, naming `field` and the split it chose, when `split` holds nothing.

  Raises:
    DatasetError: in one line.
  """
  if split.num_examples == 0:
    raise sources.DatasetError(
      f'{field}: {split.spec!r} selects no examples of {dataset} (a slice or class subset of a '
      'smaller split than it was written for?)'
    )


def check_values(config: Any) -> list[str]:
  """The run-level numbers checked for sense where the run reads them, before anything
  else: steps, batch sizes, cadences, checkpoints kept, label smoothing, patience, budgets;
  then the optimizer's (`optim.check`).

  Returns:
    Warnings for legal but surprising values, each naming its field: `num_train_steps=0`
    (nothing trains: the run evaluates its starting weights, e.g. a checkpoint's), and the
    optimizer's.

  Raises:
    ConfigError: naming the first bad field, its value and what would be valid.
  """

  def whole(field: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise errors.ConfigError(f'{field}={value!r} is not a whole number >= {least}')

  whole('num_train_steps', config.get('num_train_steps'), 0)
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps'):
    whole(field, config.get(field), 1)
  for field in ('eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    whole(field, config.get(field), 1)
  whole('early_stopping_patience', config.get('early_stopping_patience', 0), 0)
  whole('accum_steps', config.get('accum_steps', 1), 1)
  whole('dataset.examples_per_class', config.dataset.get('examples_per_class', 0), 0)
  whole('dataset.shuffle_buffer', config.dataset.get('shuffle_buffer', 1), 1)
  whole('dataset.shards', config.dataset.get('shards', 1), 1)
  smoothing = config.get('label_smoothing', 0.0)
  if (
    isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1
  ):
    raise errors.ConfigError(f'label_smoothing={smoothing!r} is not a number in [0, 1)')
  warnings = []
  if config.num_train_steps == 0:
    warnings.append(
      'num_train_steps=0: nothing trains; the run evaluates its starting weights '
      '(init.checkpoint, or the initialisation)'
    )
  return warnings + optim.check(config.optimizer, config.num_train_steps)


def check_plans(
  config: Any, num_classes: int, expression: syntax.Expression | None = None
) -> tuple[nn.Module, list[policies.Stage], tuple]:
  """The model, its plan's stages and the tuner's `(layers, tuner, call)` (() without), every
  stage's plan and optimizer built on parameter shapes (`tuners.plan_shapes`): a check of the
  config's model, policy and optimizer that reads no data and computes nothing.

  Args:
    config: the run's config.
    num_classes: the task's classes.
    expression: the policy, parsed (None: parsed here).

  Raises:
    InputError: a bad model, policy, optimizer or activation cache setting, in one line.
  """
  model = build_model(config.model, num_classes)
  structure, size = model.block_structure(), config.dataset.image_size
  # Shapes only; a model that cannot take the image size says so here.
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
  )
  # Every stage is planned and its optimizer built on shapes now, so a bad stage late in a
  # schedule is an error at launch, not hours into the run.
  stages = policies.plan_stages(structure, config.policy, config.num_train_steps, expression)
  params = tuners.plan_shapes(shapes['params'], structure, stages)
  shaped = [policies.make_plan(params, structure, config.policy, stage=s) for s in stages]
  for plan in shaped:
    # Built for its errors only; the run's optimizers are made again on the real plans.
    optim.make(plan, config.optimizer, config.num_train_steps, anchor=params)
    if plan.dynamic and config.get('ema_decay', 0.0):  # the averaged entries would move
      raise policies.PlanError(f'ema_decay with a dynamic mask ({plan.name}): not supported')
  adapted = tuners.adapted(stages, shaped)  # (layers, tuner, call), or () without a tuner
  activation_cache.check_mode(
    config.get('activation_cache', 'off'), model, shaped, augment=config.dataset.augment
  )
  return model, stages, adapted


# --- The run. ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
# A stage's plan and optimizer are built together, once, at launch: the optimizer's
# structure (partition labels, entry masks) depends on the plan's masks.
class StagePlan:
  """A stage of the run with its plan (masks chosen) and optimizer."""

  stage: policies.Stage
  plan: policies.Plan
  tx: optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class Run:
  """A run, assembled: everything the loop needs before its first step.

  Attributes:
    config: the run's config.
    workdir: the run directory's file names.
    spread: how the steps run over the devices.
    model: the unbound model.
    data: the splits, their order and image preparation.
    variables: the initial variables (`{'params', 'batch_stats'}`, a checkpoint's or fresh,
      with a tuner's adapters).
    stages: every stage with its plan and optimizer (one for a plain plan).
    evaluators: what runs at each eval (`ftlab.evals`), in order.
    scorer: the score passes and dynamic-mask changes (`ftlab.scoring`).
    start: the stage `state` is in.
    state: the host state to start from: fresh at step 0, or resumed.
    frozen_reference: sha256 of each leaf the stage freezes, as the stage started.
    changes: config fields changed since the workdir's last launch (`{field: [old, new]}`).
    plan_label: the plan's name for the summary (the schedule's, for a multi-stage plan).
    init: where the initial variables came from (for the summary).
    activation_cache_dir: where disk activation caches go (`activation_cache_dir`).
    warnings: what was legal but surprising in the config (`check_values`), said once at
      launch and kept in the run's record.
  """

  config: Any
  workdir: workdir.Workdir
  spread: parallel.Spread
  model: nn.Module
  data: input_pipeline.Data
  variables: PyTree
  stages: tuple[StagePlan, ...]
  evaluators: tuple[evals.base.Evaluator, ...]
  scorer: scoring.Scorer
  start: StagePlan
  state: train.TrainState
  frozen_reference: dict[str, str]
  changes: dict[str, list]
  plan_label: str
  init: init_from.Source | None
  activation_cache_dir: str
  warnings: tuple[str, ...] = ()

  # Indexed by steps done, not by the step about to run: a checkpoint of step N is resumed
  # by the stage that takes step N + 1, and a boundary is crossed when that stage changes.
  def stage_at(self, steps_done: int) -> StagePlan:
    """The stage that takes step `steps_done + 1`."""
    return self.stages[policies.stage_at([s.stage for s in self.stages], steps_done).index]


def initial_state(config: Any, variables: PyTree, stage: StagePlan) -> train.TrainState:
  """The step-0 state from `variables` under the stage's plan, with an EMA of its entries
  when `config.ema_decay` is set."""
  kept = ema.entries(stage.plan) if config.get('ema_decay', 0.0) else None
  return train.create_train_state(variables, stage.tx, kept)


def initial_variables(
  config: Any, model: nn.Module, adapted: tuple, source: init_from.Source | None = None
) -> PyTree:
  """The run's initial variables: the model's fresh ones from the run's seed, the init
  checkpoint loaded into them (`init_from.variables`), and a tuner's adapters beside the
  loaded kernels (drawn from the same key, so step 0 is the loaded model). Also how a
  finished run's starting weights are rebuilt (`ftlab.analysis.mask_report`).

  Args:
    config: the run's config (`seed`, `dataset.image_size`, `init`).
    model: the run's model.
    adapted: `(layers, tuner, call)` from `check_plans`, or ().
    source: the resolved `config.init` (None: resolved here).

  Raises:
    InitError: weights that are missing, do not fit, or hold inf/NaN.
  """
  # Stream 0 of the seed; the training loop's keys are stream 1, so changing how many numbers
  # the init draws never shifts the training's dropout.
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = init_from.variables(model, config.dataset.image_size, rng_init, config.init, source)
  if adapted:
    layers, tuner, call = adapted
    variables['params'] = tuners.attach(variables['params'], layers, tuner, call, rng=rng_init)
  return variables


def make_run(config: Any, directory: str, *, allow_config_change: bool = False) -> Run:
  """Assembles the run `config` describes in `directory`, resuming what is there.

  Joins a multi-process job first (`config.multi_host`), as every device query follows.

  Raises:
    InputError: a bad config or input, or a config other than the workdir's run (unless
      `allow_config_change`); nothing is compiled or written before.
  """
  files = workdir.Workdir(directory)
  cache_dir = files.activation_cache_dir(config.get('activation_cache_dir', ''))
  # Before any device query below: JAX must not start its backends before the job is joined,
  # and until then `jax.device_count()` would count this process's devices only.
  parallel.initialize_distributed(config.multi_host)
  changes = workdir.check_config_change(config, files, allow_config_change)
  warnings = tuple(check_values(config))
  for warning in warnings:
    logging.warning('%s', warning)
  spread = parallel.Spread(config.parallelism)
  parallel.check_divisible(config.batch_size, jax.device_count())
  parallel.check_divisible(config.eval_batch_size, jax.device_count())
  train.check_step_options(
    config.get('accum_steps', 1), config.get('ema_decay', 0.0), config.batch_size
  )
  # A typo in the plan must not cost a dataset download or a weight port first.
  expression = syntax.parse(config.policy.name, config.policy)  # once, before data is read
  source = init_from.source(config.init)  # named weights are downloaded and ported here
  data = make_data(config, init_from.preprocessing(config.dataset.preprocess, source))
  model, stages, adapted = check_plans(config, data.train.num_classes, expression)
  variables = initial_variables(config, model, adapted, source)
  structure = model.block_structure()
  # The scorer's scope is planned on shapes: with `masks_pending`, it marks every leaf a
  # per-element selector could choose, which is what the score passes must differentiate.
  scope = policies.make_plan(
    jax.eval_shape(lambda: variables['params']), structure, config.policy, stage=stages[0]
  )
  scorer = scoring.Scorer(spread, model, scope, data)
  scores_fn = lambda kind, num_batches: scorer.scores(kind, num_batches, variables)
  # The loaded weights, not a resumed state's: L2-SP pulls toward the pretrained point for
  # the whole run, across stages and restarts.
  anchor = paths.flatten(variables['params'])  # where L2-SP pulls
  planned = []
  for stage in stages:
    plan = policies.make_plan(
      variables['params'], structure, config.policy, stage=stage, scores_fn=scores_fn
    )
    tx = optim.make(
      plan,
      config.optimizer,
      config.num_train_steps,
      # A later stage's schedule continues the run's one schedule rather than restarting warmup.
      first_step=stage.start,
      anchor=anchor,
      seed=config.seed,
    )
    planned.append(StagePlan(stage, plan, tx))
  evaluators = evals.base.build(
    functools.partial(_evaluator_setting, config, model, data, spread, variables, source)
  )
  start, state = planned[0], initial_state(config, variables, planned[0])
  frozen_reference = policies.frozen_checksums(start.plan, state.params)
  # Everything above is built whether or not a checkpoint exists: the restore needs the fresh
  # state as its target (structure, shapes, dtypes), and the checks above must pass either way.
  if checkpoint.latest_step(files.checkpoints) is not None:
    state, start, plan_changed = _resume(files.checkpoints, config, variables, planned)
    reference = state.params if plan_changed else variables['params']
    # A stage freezes what it starts from; a plain resume checks against the loaded values.
    frozen_reference = policies.frozen_checksums(start.plan, reference)
  label = planned[0].plan.name if len(planned) == 1 else str(expression)
  return Run(
    config=config,
    workdir=files,
    spread=spread,
    model=model,
    data=data,
    variables=variables,
    stages=tuple(planned),
    evaluators=evaluators,
    scorer=scorer,
    start=start,
    state=state,
    frozen_reference=frozen_reference,
    changes=changes,
    plan_label=label,
    init=source,
    activation_cache_dir=cache_dir,
    warnings=warnings,
  )


def _evaluator_setting(config, model, data, spread, variables, source, name: str):
  """An evaluator's `Setting`: its own section of `config.evals` and the run's facts."""
  # Evaluators build their own splits (the few-shot probe's sets, the forgetting evaluator's
  # images) with the run's data settings, so a split is read the same way wherever it is built.
  ds, kwargs = config.dataset, _dataset_kwargs(config)

  def build_split(split: str, examples_per_class: int = 0, what: str = ''):
    found = datasets.build_dataset(
      ds.name,
      split,
      examples_per_class=examples_per_class,
      budget_name=what or 'dataset.examples_per_class',
      **kwargs,
    )
    check_not_empty(found, f'evals.{name} split', ds.name)
    return found

  section = config.get('evals', {}).get(name, None)
  return evals.base.Setting(
    config=section if section is not None else {},
    model=model,
    data=data,
    spread=spread,
    variables=variables,
    init_directory=source.directory if source else '',
    build_split=build_split,
    split_names={'train': ds.train_split, 'eval': ds.eval_split},
    ema=bool(config.get('ema_decay', 0.0)),
  )


# --- Resuming. --------------------------------------------------------------------------------


def _resume(
  ckpt_dir: Any, config: Any, variables: PyTree, stages: list[StagePlan]
) -> tuple[train.TrainState, StagePlan, bool]:
  """The newest readable checkpoint, its stage, and whether the plan changed since it was
  written.

  Under the same plan the whole state is restored; under a changed plan (a new stage) only
  the parameters, statistics and step, and the optimizer state starts afresh. A damaged
  newest checkpoint is moved aside (`damaged-<step>`), with a warning, and the previous
  one is used; nothing is deleted.

  Raises:
    MismatchError: a checkpoint of another model or optimizer.
    InputError: no readable checkpoint.
  """
  damaged = []
  # Newest first: a write cut short by preemption damages at most the newest step, and the
  # one before it is the best thing left.
  for step in reversed(checkpoint.all_steps(ckpt_dir)):
    # Each candidate is restored into its own stage's state: an older checkpoint can belong to
    # an earlier stage, whose optimizer state has another structure.
    at = stages[policies.stage_at([s.stage for s in stages], step).index]
    try:
      restored, plan_changed = _restore_step(
        ckpt_dir, step, initial_state(config, variables, at), at
      )
    except checkpoint.MismatchError:  # another model or optimizer: the user's to fix
      raise
    # A damaged step is remembered and the next older one tried; it is only moved aside once an
    # older one restores, so a run whose every checkpoint fails keeps them all where they were.
    except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many kinds)
      damaged.append((step, e))
    else:
      for bad_step, error in damaged:
        logging.warning(
          'checkpoint step %d is damaged (%s: %s); resuming from step %d instead; '
          'moved to damaged-%d',
          bad_step,
          type(error).__name__,
          str(error).splitlines()[0][:200],
          step,
          bad_step,
        )
        # Moved, not deleted: the damaged files are evidence, and the next launch must not find
        # this step again as the newest.
        if jax.process_index() == 0:  # on an object store: a copy and a delete of each object
          bad = storage.path(ckpt_dir) / str(bad_step)
          bad.rename(bad.parent / f'damaged-{bad_step}')
      return restored, at, plan_changed
  raise errors.InputError(
    f'no readable checkpoint in {ckpt_dir}; damaged steps: '
    + ', '.join(f'{s} ({type(e).__name__})' for s, e in damaged)
  )


def _restore_step(
  ckpt_dir: Any, step: int, state: train.TrainState, at: StagePlan
) -> tuple[train.TrainState, bool]:
  meta = checkpoint.restore_meta(ckpt_dir, step)
  plan = at.plan
  key = policies.PlanKey.from_json(meta.get('plan_key'))
  # Checkpoints from before plan keys were recorded have only the display name to compare.
  same = key == plan.key if key is not None else meta.get('plan') == plan.name
  if same:
    try:
      restored, _ = checkpoint.restore(ckpt_dir, state, step)
    except checkpoint.MismatchError as e:  # another model, optimizer or ftlab: say which ftlab
      writer = meta.get('ftlab_version', 'a version that did not record it (before 0.1.0+d703480)')
      raise checkpoint.MismatchError(
        f'checkpoint step {step} was written by ftlab {writer}; this is ftlab {ftlab.version()}. '
        + str(e),
        e.path,
        e.expected,
        e.found,
        e.skipped,
        e.unused_dont_load,
      ) from None
    logging.info('resumed from step %d', step)
    return restored, False
  # A new stage: parameters carry over, the optimizer state is rebuilt for the new plan.
  logging.info(
    'plan changed from %s to %s at step %d: optimizer state rebuilt',
    meta.get('plan'),
    plan.name,
    step,
  )
  # Only the parameters and statistics are read: the stored optimizer state belongs to the
  # previous stage's plan and has another structure.
  params = checkpoint.load_params(ckpt_dir, state.params, step=step)
  stats = state.batch_stats
  if stats:
    stats = checkpoint.load_params(ckpt_dir, stats, key='batch_stats', step=step)
  return state.replace(
    # The same dtype as a fresh state's step, so the compiled train step sees one signature.
    step=jnp.asarray(step, jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=at.tx.init(params),
    ema=ema.init(params, ema.entries(plan)) if state.ema else {},
  ), True


def cached_sources(run: Run, plan: policies.Plan, host_state: train.TrainState):
  """`activation_cache.prepare` for a stage (`config.activation_cache`): the rest of the
  network and its batches on cached prefix outputs (the evaluators' own splits too), or None
  when the stage runs uncached."""
  config = run.config
  # The evaluators' own splits are cached too, or they would feed raw images to a model that
  # starts after the cached prefix.
  extra = {name: split for e in run.evaluators for name, split in e.splits().items()}
  return activation_cache.prepare(
    config.get('activation_cache', 'off'),
    run.model,
    plan,
    {'params': host_state.params, 'batch_stats': host_state.batch_stats},
    run.spread,
    run.data,
    directory=run.activation_cache_dir,
    memory_limit_mb=float(
      config.get('activation_cache_memory_mb', activation_cache.DEFAULT_MEMORY_LIMIT_MB)
    ),
    extra=extra or None,
  )
