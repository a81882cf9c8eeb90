"""The run assembled once from its config: model, data, variables, stages, resume.

`make_run(config, workdir)` is everything `ftlab.loop` needs before its first step: the
model (its convolutions lowered for the backend it runs on), the `Data` read once, the
initial variables (a checkpoint's, strictly checked, with the likely cause and the flags that
fix a mismatch), the stages of the plan and each stage's `(plan, tx)`, the Fisher pass that
per-element plans choose their entries by, and the state to start from (fresh, or resumed from
the newest readable checkpoint, a damaged one moved aside). Every config or input problem is a
one-line `ConfigError` raised here, before anything is compiled or written; only typed errors
of the checks become one (a programming error keeps its traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import re
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ftlab import (
  activation_cache,
  checkpoint,
  datasets,
  input_pipeline,
  optim,
  parallel,
  paths,
  policies,
  preprocessing,
  workdir,
)
from ftlab.models import lowering, vgg
from ftlab.train import TrainState, bind_model, create_train_state, fisher_step

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


def make_data(config: Any) -> input_pipeline.Data:
  """The run's splits (`eval`, and `minival` carved off the training split if configured),
  their order and image preparation.

  Raises:
    ConfigError: an unknown preprocessing or augmentation, or a `datasets.DatasetError`.
  """
  ds = config.dataset
  with config_errors(ValueError):
    preprocessing.check(ds.preprocess)
  if ds.augment not in input_pipeline.AUGMENTATIONS:
    augmentations = ', '.join(input_pipeline.AUGMENTATIONS)
    raise ConfigError(f'unknown augmentation {ds.augment!r}; valid: {augmentations}')
  common = dict(
    data_dir=ds.data_dir or None,
    download=ds.download,
    fashion_mnist_dir=ds.local_dir or None,
    classes=tuple(ds.classes),
    seed=config.seed,
  )
  with config_errors(datasets.DatasetError):
    train_split, splits = ds.train_split, {'eval': ds.eval_split}
    if ds.minival:
      train_split, splits['minival'] = datasets.minival_split(ds.train_split, ds.minival)
    train = datasets.build_dataset(
      ds.name, train_split, examples_per_class=ds.examples_per_class, **common
    )
    evals = {k: datasets.build_dataset(ds.name, s, **common) for k, s in splits.items()}
  order = input_pipeline.BatchOrder(
    config.batch_size,
    seed=config.seed,
    shuffle_buffer=ds.shuffle_buffer,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return input_pipeline.Data(
    train, evals, order, config.eval_batch_size, ds.image_size, ds.preprocess, ds.augment, ds.name
  )


def check_plans(config: Any, num_classes: int) -> tuple[nn.Module, list[policies.Stage]]:
  """The model and the stages of its plan, with every stage's plan and optimizer built on
  parameter shapes: a check of the config's model, policy and optimizer that reads no data
  and computes nothing.

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
    shaped_plans = []
    for stage in stages:
      shaped = policies.make_plan(shapes['params'], structure, config.policy, stage=stage)
      optim.make(shaped, config.optimizer, config.num_train_steps, anchor=shapes['params'])
      shaped_plans.append(shaped)
  with config_errors(ValueError):
    activation_cache.check_mode(
      config.get('activation_cache', 'off'), model, shaped_plans, augment=config.dataset.augment
    )
  return model, stages


# --- The initial variables. ------------------------------------------------------------------


def init_variables(model: nn.Module, image_size: int, rng: jax.Array, init_cfg: Any) -> PyTree:
  """Fresh variables, then (if `init_cfg.checkpoint`) the checkpoint's, strictly checked.

  Parameters matching an `init_cfg.dont_load` regex keep their fresh values (a new head).

  Raises:
    ConfigError: the checkpoint is missing, does not fit the model (the message says the
      likely cause and the flags that fix it) or holds inf/NaN (unless
      `init_cfg.allow_nonfinite`).
  """
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, x)
  if not init_cfg.checkpoint:
    return variables
  dont_load = tuple(init_cfg.dont_load)
  source = init_cfg.checkpoint
  if os.path.isdir(os.path.join(source, 'checkpoints')):  # a run's workdir
    source = os.path.join(source, 'checkpoints')
  allow_nonfinite = bool(init_cfg.get('allow_nonfinite', False))
  load = functools.partial(checkpoint.load_params, source, allow_nonfinite=allow_nonfinite)
  try:
    loaded = {'params': load(variables['params'], dont_load=dont_load)}
    if 'batch_stats' in variables:
      # The same patterns, less those that name no statistics (a dense head has none).
      stats_paths = paths.flatten(variables['batch_stats'])
      stats_dont_load = [p for p in dont_load if any(re.fullmatch(p, q) for q in stats_paths)]
      loaded['batch_stats'] = load(
        variables['batch_stats'], dont_load=stats_dont_load, key='batch_stats'
      )
  except checkpoint.MismatchError as e:
    advice = mismatch_advice(e, model, image_size)
    raise ConfigError(f'init.checkpoint: {e}' + (f'. {advice}' if advice else '')) from None
  except checkpoint.NonFiniteError as e:
    raise ConfigError(
      f'init.checkpoint: {e}; a run started from them trains to NaN. Re-export the weights '
      '(a float16 save overflows beyond 65504), or set --config.init.allow_nonfinite=True '
      'to load them anyway'
    ) from None
  except FileNotFoundError as e:
    raise ConfigError(f'init.checkpoint: {e}') from None
  return loaded


def mismatch_advice(error: checkpoint.MismatchError, model: Any, image_size: int) -> str:
  """The likely cause of a checkpoint that does not fit the model, and the flags that fix it:
  another VGG (name, width, head), another class count, or an fc1 built for another image
  size; '' when the shapes tell nothing more than the error."""
  if error.unused_dont_load:
    layers = sorted({p.split('/')[0] for p in error.expected})
    return f'Paths are layer/name (e.g. predictions/kernel); the layers: {", ".join(layers)}'
  want, have = vgg.architecture_of(error.expected), vgg.architecture_of(error.found)
  fixes = []
  if have['name'] and have['name'] != want['name']:
    fixes.append(f'--config.model.name={have["name"]}')
  if have['width'] and want['width'] and not np.isclose(have['width'], want['width']):
    fixes.append(f'--config.model.width={have["width"]:g}')
  if have['head'] != want['head'] and have['head'] != 'none':
    fixes.append(f'--config.model.head={have["head"]}')
  if fixes:
    found = f'a {have["name"] or "VGG"} (width {have["width"]:g}, {have["head"]} head)'
    return f'Likely cause: the checkpoint is {found}, another model: {" ".join(fixes)}'
  advice = []
  layers = lambda names: {p.split('/')[0] for p in names}
  fresh = sorted(layers(set(error.expected) - error.skipped) - layers(error.found))
  if fresh and have['head'] == 'none':
    regexes = ', '.join(f'"{layer}/.*"' for layer in fresh)
    advice.append(
      f'the checkpoint has no head: start {", ".join(fresh)} fresh with '
      f"--config.init.dont_load='({regexes},)'"
    )
  differs = lambda p: (
    p in error.found
    and p in error.expected
    and p not in error.skipped
    and error.found[p] != error.expected[p]
  )
  if differs('predictions/kernel'):
    advice.append(
      f"the checkpoint's head has {have['num_classes']} classes, this task "
      f'{want["num_classes"]}: keep a fresh head with '
      """--config.init.dont_load='("predictions/.*",)'"""
    )
  first_dense = next((p for p in ('fc1/kernel', 'fc/kernel') if differs(p)), '')
  if first_dense:
    channels = vgg.scaled(vgg.BLOCK_CHANNELS[-1], model.width)
    built = math.isqrt(error.found[first_dense][0] // channels)
    now = math.isqrt(error.expected[first_dense][0] // channels)
    layer = first_dense.split('/')[0]
    advice.append(
      f'{layer} was built for a {built}x{built}x{channels} block-5 map ({built * 32} px images '
      f'without pooling), and this model gives it {now}x{now} at image_size {image_size}: keep '
      f'the pretrained {layer} with --config.dataset.image_size={built * 32}, or with '
      f'--config.model.adaptive_pool={built} (average-pools block 5 to {built}x{built} at any '
      'image size, as torchvision does)'
    )
  return ('Likely cause: ' + '; and '.join(advice)) if advice else ''


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
  _setups: dict = dataclasses.field(default_factory=dict, repr=False)

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

  def fisher(self, num_batches: int | None) -> dict[str, np.ndarray]:
    """Mean squared per-example gradient of every leaf a plan could train (the empirical
    Fisher's diagonal, for `fisher` and `child_tuning_d`): over `num_batches` shuffled
    training batches without augmentation, or over every training example once when None."""
    spread, variables = self.spread, self.variables
    scope = policies.make_plan(
      jax.eval_shape(lambda: variables['params']), self.model.block_structure(), self.config.policy
    )
    per_device = self.data.order.global_batch // jax.device_count()
    chunk = max(c for c in range(1, 9) if per_device % c == 0)
    p_fisher = spread.compile(
      functools.partial(
        fisher_step,
        model=bind_model(self.model, scope),
        trainable_mask=scope.trainable_mask,
        chunk=chunk,
      ),
      in_kinds=(parallel.REPLICATED, parallel.SHARDED),
    )
    state = spread.replicate(
      TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables['params'],
        batch_stats=variables.get('batch_stats', {}),
        opt_state=(),
      )
    )
    if num_batches is None:
      batches = self.data.eval_batches('train', self.data.order.global_batch)
    else:
      batches = itertools.islice(self.data.train_batches(0, augment='none'), num_batches)
    totals = None
    for batch in batches:
      sums = p_fisher(state, spread.shard(batch))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(spread.unreplicate(totals))
    count = max(float(totals['count']), 1.0)
    flat = paths.flatten(totals['squared_grads'])
    logging.info('Fisher information from %d examples over %d leaves', count, len(flat))
    return {p: np.asarray(v) / count for p, v in flat.items()}


def make_run(config: Any, directory: str, *, allow_config_change: bool = False) -> Run:
  """Assembles the run `config` describes in `directory`, resuming what is there.

  Joins a multi-process job first (`config.multi_host`), as every device query follows.

  Raises:
    ConfigError: a bad config or input, or a config other than the workdir's run (unless
      `allow_config_change`); nothing is compiled or written before.
  """
  parallel.initialize_distributed(config.multi_host)
  files = workdir.Workdir(directory)
  with config_errors(workdir.ConfigChanged):
    changes = workdir.check_config_change(config, files, allow_config_change)
  with config_errors(ValueError):
    spread = parallel.Spread(config.parallelism)
    parallel.check_divisible(config.batch_size, jax.device_count())
    parallel.check_divisible(config.eval_batch_size, jax.device_count())
  with config_errors(policies.PlanError):
    expression = policies.check_policy_name(config.policy.name, config.policy)
  data = make_data(config)
  model, stages = check_plans(config, data.train.num_classes)
  rng_init = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = init_variables(model, config.dataset.image_size, rng_init, config.init)
  run = Run(config, files, spread, model, data, variables, stages, changes=changes)
  run.stage = stages[0]
  plan, tx = run.setup(run.stage)
  run.state = create_train_state(variables, tx)
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
      restored, plan_changed = _restore_step(
        ckpt_dir, step, create_train_state(run.variables, tx), plan, tx
      )
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
        if jax.process_index() == 0:
          os.rename(
            os.path.join(ckpt_dir, str(bad_step)), os.path.join(ckpt_dir, f'damaged-{bad_step}')
          )
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
  ), True


def sources(
  run: Run, plan: policies.Plan, host_state: TrainState
) -> tuple[nn.Module, Callable, dict, str | None]:
  """The model a stage's steps run, their batch sources (`start_step -> batches`, and
  `{split: () -> batches}`) and the first block they run when a prefix is cached: with
  `config.activation_cache` on and a frozen prefix, the rest of the network on cached
  prefix outputs."""
  config = run.config
  cached = activation_cache.prepare(
    config.get('activation_cache', 'off'),
    run.model,
    plan,
    {'params': host_state.params, 'batch_stats': host_state.batch_stats},
    run.spread,
    run.data,
    directory=run.workdir.activation_cache,
    memory_limit_mb=float(
      config.get('activation_cache_memory_mb', activation_cache.DEFAULT_MEMORY_LIMIT_MB)
    ),
  )
  if cached is None:
    return run.model, run.data.train_batches, run.data.eval_sources(), None
  logging.info('activation cache: %s runs from %s on cached outputs', plan.name, cached.start)
  return cached.model, cached.train_batches, cached.eval_batches, cached.start
