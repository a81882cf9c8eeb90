"""The run assembled once from its config: model, data, variables, stages, resume.

`make_run(config, workdir)` is everything `ftlab.loop` needs before its first step: the
model (its convolutions lowered for the backend it runs on), the `Data` read once, the
initial variables (a checkpoint's, strictly checked, with the likely cause and the flags that
fix a mismatch), the stages of the plan and each stage's `(plan, tx)`, the Fisher and gradient
passes that per-element and dynamic plans choose entries by, the extra evaluators, and the
state to start from (fresh, or resumed from the newest readable checkpoint, a damaged one
moved aside). Every config or input problem is a one-line `ConfigError` raised here, before
anything is compiled or written; a programming error keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ftlab import activation_cache, init_from, parallel, paths, train
from ftlab.data import datasets, input_pipeline, preprocessing, sources
from ftlab.evals import fewshot, forgetting
from ftlab.files import checkpoint, storage, workdir
from ftlab.models import lowering, vgg
from ftlab.plans import dynamic_masks, optim, policies, sparse_masks
from ftlab.plans.methods import lora
from ftlab.train import TrainState, bind_model, create_train_state

PyTree = Any
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConfigError(ValueError):
  """A config or input problem, found before any compute starts (exit code 2)."""


@contextlib.contextmanager
def config_errors(*kinds: type[Exception]) -> Iterator[None]:
  """Turns the typed errors `kinds` of a config check into `ConfigError`, in one line."""
  try:
    yield
  except kinds as e:
    raise ConfigError(str(e)) from e


def flag_error_line(error: Exception) -> str:
  """A bad `--config` flag's error in one line: a config file that raised comes wrapped in
  its traceback, whose last line is the error; a KeyError's message is its argument."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else error
  lines = [line for line in str(text).strip().splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    return lines[-1]
  return ' '.join(' '.join(lines).split())


def resolve_conv_lowering(choice: str) -> str:
  """`conv` or `matmul` for `config.model.conv_lowering` on this process's default backend."""
  return lowering.for_backend(choice, jax.default_backend())


def build_model(model_cfg: Any, num_classes: int) -> nn.Module:
  """The VGG that `config.model` describes, with `num_classes` outputs, its convolutions
  lowered for the default backend (`auto`: patch matmuls on CPU).

  Raises:
    ValueError: an unknown name, head, dtype or lowering.
  """
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f'model dtype {model_cfg.dtype!r} is not one of {list(DTYPES)}')
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
    data_dir=ds.data_dir or None,
    download=ds.download,
    fashion_mnist_dir=ds.local_dir or None,
    classes=tuple(ds.classes),
    seed=config.seed,
  )


def make_data(config: Any, preprocess: str | None = None) -> input_pipeline.Data:
  """The run's splits (`eval`, and `minival` carved off the training split if configured),
  their order and image preparation (`preprocess`, default the config's).

  Raises:
    ConfigError: an unknown preprocessing or augmentation, or a `sources.DatasetError`.
  """
  ds = config.dataset
  if preprocess is None and ds.preprocess == 'auto':  # the init weights' own convention
    with config_errors(init_from.InitError):
      preprocess = init_from.preprocessing('auto', init_from.source(config.init))
  preprocess = preprocess or ds.preprocess
  with config_errors(ValueError):
    preprocessing.check(preprocess)
  if ds.augment not in input_pipeline.AUGMENTATIONS:
    augmentations = ', '.join(input_pipeline.AUGMENTATIONS)
    raise ConfigError(f'unknown augmentation {ds.augment!r}; valid: {augmentations}')
  common = _dataset_kwargs(config)
  with config_errors(sources.DatasetError):
    train_split, splits = ds.train_split, {'eval': ds.eval_split}
    if ds.minival:
      train_split, splits['minival'] = datasets.minival_split(ds.train_split, ds.minival)
    train = datasets.build_dataset(
      ds.name, train_split, examples_per_class=ds.examples_per_class, **common
    )
    evals = {k: datasets.build_dataset(ds.name, s, **common) for k, s in splits.items()}
  with config_errors(ValueError):
    order = input_pipeline.BatchOrder(
      config.batch_size,
      seed=config.seed,
      shuffle_buffer=ds.shuffle_buffer,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shards=ds.get('shards', 1),
    )
  if order.shards > train.num_examples:
    raise ConfigError(
      f'dataset.shards={order.shards} exceeds the {train.num_examples} training examples'
    )
  shards = [j for j, _, _ in order.shard_rows()]
  share = sum(len(input_pipeline.parts(train.num_examples, order.shards)[j]) for j in shards)
  logging.info('process %d of %d reads training shards %s of %d: %d of %d examples',
               order.process_index, order.process_count, shards, order.shards, share,
               train.num_examples)  # fmt: skip
  return input_pipeline.Data(
    train, evals, order, config.eval_batch_size, ds.image_size, preprocess, ds.augment, ds.name
  )


def make_evals(config: Any, data: input_pipeline.Data, model: nn.Module, variables, source):
  """The few-shot probe's sets (`fewshot.make_sets`) and the source head's drift
  (`forgetting.make_drift`) from `config.evals`, each None when off.

  Raises:
    ConfigError: what those raise (bad shots, layer or split; no loaded head).
  """
  ds, evals, kwargs = config.dataset, config.get('evals', {}), _dataset_kwargs(config)
  build = lambda split, n=0: datasets.build_dataset(ds.name, split, examples_per_class=n, **kwargs)
  with config_errors(ValueError, sources.DatasetError):
    probe = fewshot.make_sets(
      evals.get('fewshot', {}), ds.train_split, ds.eval_split, build, data, model
    )
    directory = source.directory if source else ''
    drift = forgetting.make_drift(evals.get('forgetting', {}), build, data, variables, directory)
  return probe, drift


def check_plans(config: Any, num_classes: int) -> tuple[nn.Module, list[policies.Stage], list]:
  """The model, its plan's stages and LoRA's `(layers, spec)` (() without), every stage's plan
  and optimizer built on parameter shapes (`lora.plan_shapes`): a check of the config's model,
  policy and optimizer that reads no data and computes nothing.

  Raises:
    ConfigError: a bad model, policy, optimizer or activation cache setting, in one line.
  """
  with config_errors(ValueError):
    model = build_model(config.model, num_classes)
    structure = model.block_structure()
    size = config.dataset.image_size
    # Shapes only; a model that cannot take the image size says so here.
    shapes = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
    )
  with config_errors(policies.PlanError):
    stages = policies.plan_stages(structure, config.policy, config.num_train_steps)
    shapes['params'], shaped_plans = lora.plan_shapes(shapes['params'], structure, stages), []
    for stage in stages:
      shaped = policies.make_plan(shapes['params'], structure, config.policy, stage=stage)
      optim.make(shaped, config.optimizer, config.num_train_steps, anchor=shapes['params'])
      shaped_plans.append(shaped)
      dynamic = re.search(rf'\b({"|".join(sparse_masks.DYNAMIC_POLICIES)})\(', shaped.name)
      if dynamic and config.get('ema_decay', 0.0):  # the averaged entries would move
        raise policies.PlanError(f'ema_decay with a dynamic mask ({shaped.name}): not supported')
    adapted = lora.adapters(stages, shaped_plans)  # (layers, spec), or () without LoRA
  with config_errors(ValueError):
    activation_cache.check_mode(
      config.get('activation_cache', 'off'), model, shaped_plans, augment=config.dataset.augment
    )
  return model, stages, adapted


# --- The run. ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A run, assembled: everything the loop needs before its first step.

  Attributes:
    config: the run's config.
    workdir: the run directory's file names.
    spread: how the steps run over the devices.
    model: the unbound model.
    data: the splits, their order and image preparation.
    variables: the initial variables (`{'params', 'batch_stats'}`, a checkpoint's or fresh).
    stages: the plan's stages (one for a plain plan).
    stage: the stage `state` is in.
    state: the host state to start from: fresh at step 0, or resumed.
    frozen_reference: sha256 of each leaf the stage freezes, as the stage started.
    changes: config fields changed since the workdir's last launch (`{field: [old, new]}`).
    plan_label: the plan's name for the summary (the schedule's, for a multi-stage plan).
    init: where the initial variables came from (for the summary).
    fewshot: the few-shot probe's sets (`config.evals.fewshot`), or None.
    drift: the source head's agreement with the loaded model (`config.evals.forgetting`).
    activation_cache_dir: where disk activation caches go (`activation_cache_dir`).
  """

  config: Any
  workdir: workdir.Workdir
  spread: parallel.Spread
  model: nn.Module
  data: input_pipeline.Data
  variables: PyTree
  stages: list[policies.Stage]
  stage: policies.Stage = None
  state: TrainState = None
  frozen_reference: dict[str, str] = dataclasses.field(default_factory=dict)
  changes: dict[str, list] = dataclasses.field(default_factory=dict)
  plan_label: str = ''
  init: init_from.Source | None = None
  fewshot: fewshot.Sets | None = None
  drift: forgetting.Drift | None = None
  activation_cache_dir: str = ''
  _setups: dict = dataclasses.field(default_factory=dict, repr=False)
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)  # gradient passes, remask

  def setup(self, stage: policies.Stage) -> tuple[policies.Plan, optax.GradientTransformation]:
    """The stage's plan (per-element masks chosen on the initial weights) and optimizer."""
    if stage.index not in self._setups:
      config = self.config
      plan = policies.make_plan(
        self.variables['params'],
        self.model.block_structure(),
        config.policy,
        stage=stage,
        fisher_fn=self.fisher,
      )
      tx = optim.make(
        plan,
        config.optimizer,
        config.num_train_steps,
        first_step=stage.start,
        anchor=paths.flatten(self.variables['params']),
        seed=config.seed,
      )
      self._setups[stage.index] = plan, tx
    return self._setups[stage.index]

  def initial_state(self, plan: policies.Plan, tx: optax.GradientTransformation) -> TrainState:
    """The step-0 state from the initial variables under `plan`, with an EMA of its
    entries when `config.ema_decay` is set."""
    ema = train.ema_entries(plan) if self.config.get('ema_decay', 0.0) else None
    return create_train_state(self.variables, tx, ema)

  def fisher(
    self, num_batches: int | None, variables: PyTree = None, start_step: int = 0
  ) -> dict[str, np.ndarray]:
    """Mean squared per-example gradient of every leaf a plan could train (the empirical
    Fisher's diagonal, for `fisher`, `child_tuning_d` and `reselect(fisher(...))`): over
    `num_batches` shuffled training batches from `start_step` on, without augmentation, or
    over every training example once when None; at `variables` (default: the initial ones)."""
    sums = self._gradient_pass('fisher', num_batches, variables, start_step)
    count = max(float(sums['count']), 1.0)
    flat = paths.flatten(sums['squared_grads'])
    logging.info('Fisher information from %d examples over %d leaves', count, len(flat))
    return {p: np.asarray(v) / count for p, v in flat.items()}

  def gradient(
    self, num_batches: int | None, variables: PyTree, start_step: int = 0
  ) -> dict[str, np.ndarray]:
    """The mean loss gradient over the batches `fisher` reads (model in inference mode)."""
    sums = self._gradient_pass('gradient', num_batches, variables, start_step)
    count = max(float(sums['count']), 1.0)
    return {p: np.asarray(v) / count for p, v in paths.flatten(sums['grads']).items()}

  def _gradient_pass(self, kind: str, num_batches, variables, start_step: int) -> dict:
    """The summed outputs of `fisher_step` or `gradient_step` over the batches, compiled once."""
    variables = variables or self.variables
    if kind not in self._compiled:
      scope = policies.make_plan(
        jax.eval_shape(lambda: variables['params']),
        self.model.block_structure(),
        self.config.policy,
      )
      self._compiled[kind] = train.compile_scoring_step(
        kind, self.spread, bind_model(self.model, scope), scope, self.data.order.global_batch
      )
    if num_batches is None:
      batches = self.data.eval_batches('train', self.data.order.global_batch)
    else:
      batches = itertools.islice(self.data.train_batches(start_step, augment='none'), num_batches)
    return train.summed(self._compiled[kind], self.spread, variables, batches)

  def remask(self, plan: policies.Plan, state: TrainState, steps_done: int) -> TrainState:
    """The replicated `state` with a dynamic plan's next mask when one is due before step
    `steps_done + 1` (`ftlab.plans.dynamic_masks`), else `state` itself. The Fisher or gradient
    is estimated on the current weights, over the training batches of the steps to come
    (unaugmented), so a resumed run chooses the same mask."""
    dynamic = plan.dynamic
    if not dynamic_masks.is_due(dynamic, steps_done):
      return state
    host = jax.device_get(self.spread.unreplicate(state))
    variables = {'params': host.params, 'batch_stats': host.batch_stats}
    scores = {}
    if dynamic.score == 'fisher':
      scores = self.fisher(dynamic.num_batches, variables, steps_done)
    elif dynamic.score == 'gradient':
      scores = self.gradient(dynamic.num_batches, variables, steps_done)
    if dynamic not in self._compiled:
      self._compiled[dynamic] = dynamic_masks.compile_remask(dynamic)
    scores = {p: scores[p] for p in dynamic.scope if p in scores}
    opt_state, stats = self._compiled[dynamic](host.opt_state, host.params, scores)
    stats = jax.device_get(stats)
    logging.info('step %d: %s mask: %d of %d entries new', steps_done + 1, dynamic.kind,
                 stats['entered'], stats['trained'])  # fmt: skip
    return self.spread.replicate(host.replace(opt_state=opt_state))


def make_run(config: Any, directory: str, *, allow_config_change: bool = False) -> Run:
  """Assembles the run `config` describes in `directory`, resuming what is there.

  Joins a multi-process job first (`config.multi_host`), as every device query follows.

  Raises:
    ConfigError: a bad config or input, or a config other than the workdir's run (unless
      `allow_config_change`); nothing is compiled or written before.
  """
  with config_errors(storage.UnsupportedPath):
    files = workdir.Workdir(directory)
    cache_dir = files.activation_cache_dir(config.get('activation_cache_dir', ''))
  parallel.initialize_distributed(config.multi_host)
  with config_errors(workdir.ConfigChanged):
    changes = workdir.check_config_change(config, files, allow_config_change)
  with config_errors(ValueError):
    spread = parallel.Spread(config.parallelism)
    parallel.check_divisible(config.batch_size, jax.device_count())
    parallel.check_divisible(config.eval_batch_size, jax.device_count())
    train.check_step_options(
      config.get('accum_steps', 1), config.get('ema_decay', 0.0), config.batch_size
    )
  with config_errors(policies.PlanError):
    expression = policies.check_policy_name(config.policy.name, config.policy)
  with config_errors(init_from.InitError):  # named weights are downloaded and ported here
    source = init_from.source(config.init)
    preprocess = init_from.preprocessing(config.dataset.preprocess, source)
  data = make_data(config, preprocess)
  model, stages, adapted = check_plans(config, data.train.num_classes)
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  with config_errors(init_from.InitError):
    variables = init_from.variables(model, config.dataset.image_size, rng_init, config.init, source)
  if adapted:  # next to the loaded kernels: A drawn from the run's seed, B zero
    variables['params'] = lora.attach(variables['params'], *adapted, rng=rng_init)
  probe, drift = make_evals(config, data, model, variables, source)
  run = Run(config, files, spread, model, data, variables, stages, changes=changes)
  run.activation_cache_dir = cache_dir
  run.init, run.fewshot, run.drift = source, probe, drift
  run.stage = stages[0]
  plan, tx = run.setup(run.stage)
  run.state = run.initial_state(plan, tx)
  run.frozen_reference = policies.frozen_checksums(plan, run.state.params)
  if checkpoint.latest_step(files.checkpoints) is not None:
    run.state, run.stage, plan_changed = _resume(files.checkpoints, run)
    plan, _ = run.setup(run.stage)
    reference = run.state.params if plan_changed else variables['params']
    # A stage freezes what it starts from; a plain resume checks against the loaded values.
    run.frozen_reference = policies.frozen_checksums(plan, reference)
  run.plan_label = plan.name if len(stages) == 1 else str(expression)
  return run


# --- Resuming. --------------------------------------------------------------------------------


def _resume(ckpt_dir: str, run: Run) -> tuple[TrainState, policies.Stage, bool]:
  """The newest readable checkpoint, its stage, and whether the plan changed since it was
  written.

  Under the same plan the whole state is restored; under a changed plan (a new stage) only
  the parameters, statistics and step, and the optimizer state starts afresh. A damaged
  newest checkpoint is moved aside (`damaged-<step>`), with a warning, and the previous
  one is used; nothing is deleted.

  Raises:
    ConfigError: a checkpoint of another model or optimizer, or none readable.
  """
  damaged = []
  for step in reversed(checkpoint.all_steps(ckpt_dir)):
    stage = policies.stage_at(run.stages, step)
    plan, tx = run.setup(stage)
    try:
      restored, plan_changed = _restore_step(ckpt_dir, step, run.initial_state(plan, tx), plan, tx)
    except checkpoint.MismatchError as e:  # another model or optimizer: a config problem
      raise ConfigError(str(e)) from e
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
        if jax.process_index() == 0:  # on an object store: a copy and a delete of each object
          bad = storage.path(ckpt_dir) / str(bad_step)
          bad.rename(bad.parent / f'damaged-{bad_step}')
      return restored, stage, plan_changed
  raise ConfigError(
    f'no readable checkpoint in {ckpt_dir}; damaged steps: '
    + ', '.join(f'{s} ({type(e).__name__})' for s, e in damaged)
  )


def _restore_step(
  ckpt_dir: str, step: int, state: TrainState, plan: policies.Plan, tx: Any
) -> tuple[TrainState, bool]:
  meta = checkpoint.restore_meta(ckpt_dir, step)
  if meta.get('plan') == plan.name:
    restored, _ = checkpoint.restore(ckpt_dir, state, step)
    logging.info('resumed from step %d', step)
    return restored, False
  # A new stage: parameters carry over, the optimizer state is rebuilt for the new plan.
  logging.info(
    'plan changed from %s to %s at step %d: optimizer state rebuilt',
    meta.get('plan'),
    plan.name,
    step,
  )
  params = checkpoint.load_params(ckpt_dir, state.params, step=step)
  stats = state.batch_stats
  if stats:
    stats = checkpoint.load_params(ckpt_dir, stats, key='batch_stats', step=step)
  return state.replace(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=tx.init(params),
    ema=train.init_ema(params, train.ema_entries(plan)) if state.ema else {},
  ), True


def cached_sources(run: Run, plan: policies.Plan, host_state: TrainState):
  """`activation_cache.prepare` for a stage (`config.activation_cache`): the rest of the
  network and its batches on cached prefix outputs (the few-shot probe's splits too), or None
  when the stage runs uncached."""
  config, probe = run.config, run.fewshot
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
    extra={'fewshot_train': probe.train, 'fewshot_test': probe.test} if probe else None,
  )
