"""Train-step and forward time of ftlab's VGG against PyTorch and Keras, plan by plan.

  python scripts/bench.py [--model vgg16] [--width 1.0] [--head gap] [--image-size 32] \
      [--batch 64] [--plans full linear_probe 'last_blocks(1)'] [--frameworks ftlab,torch,keras] \
      [--dtype float32[,bfloat16]] [--repeats 5] [--warmup 1] [--json OUT] [--readme README.md]
  python scripts/bench.py --report-only OUT.json [--readme README.md]

ftlab's number is the run loop's own step: `policies.make_plan`, `optim.make` (config
defaults: SGD, momentum 0.9), `train.create_train_state` and `train.compile_steps` spread
over `--devices` devices (default 1), compiled ahead of time so the compile time and XLA's
FLOP count come from the very program that is timed. PyTorch and Keras get the same
network (3x3 convolutions, ReLU, 2x2 max-pools, the same head) built here with their own
layers and default initialisation, and the same plan: PyTorch freezes by
`requires_grad=False` and gives SGD (momentum 0.9) only the trainable tensors; Keras
(TensorFlow backend, `weights=None`) sets `layer.trainable` per layer and differentiates a
`tf.function` step (no XLA) with respect to the trainable variables only. BatchNorm layers
a plan freezes run on running statistics in all three. The `gap` head (global average pool
and one dense layer) is Keras's `include_top=False, pooling='avg'` plus a dense layer.

All frameworks run in this one process, interleaved (each repeat times one step of every
framework in turn, then one forward pass), so ratios hold on a noisy machine: a ratio is
the median over repeats of the per-repeat ratio. PyTorch and TensorFlow get `--threads`
threads; XLA uses its own pool (one thread per core). Forward passes are inference mode.
Bad input exits with code 2 and one line before anything is computed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import readme_section

from ftlab.errors import InputError

FRAMEWORKS = ('ftlab', 'torch', 'keras')
DTYPES = ('float32', 'bfloat16')
BENCH_HEADS = ('gap', 'imagenet', 'mlp')
README_START, README_END = '<!-- bench-results:start -->', '<!-- bench-results:end -->'


class BenchError(Exception):
  """Bad input, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise BenchError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = _Parser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='vgg16', help='vgg11 .. vgg19, `_bn` for BatchNorm')
  parser.add_argument('--width', type=float, default=1.0, help='channel multiplier')
  parser.add_argument('--head', default='gap', help='gap | imagenet | mlp')
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--image-size', type=int, default=32, help='pixels, square')
  parser.add_argument('--batch', type=int, default=64, help='global batch')
  parser.add_argument(
    '--plans', nargs='+', default=['full', 'linear_probe', 'last_blocks(1)'], help='expressions'
  )
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS), help='comma-separated')
  parser.add_argument('--dtype', default='float32', help='float32 | bfloat16, comma-separated')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps per plan')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch/TF threads')
  parser.add_argument('--devices', type=int, default=1, help='ftlab: devices the step spreads over')
  parser.add_argument('--conv-lowering', default='auto', help='ftlab: auto | conv | matmul')
  parser.add_argument('--json', default='', help='write the results here')
  parser.add_argument('--readme', default='', help='rewrite the table between the markers')
  parser.add_argument('--report-only', default='', help='only rebuild the table from this JSON')
  return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
  """Raises BenchError for anything that would fail later, before any compute."""
  if args.report_only:
    if not os.path.exists(args.report_only):
      raise BenchError(f'--report-only: no file {args.report_only}')
    return
  from ftlab import run as ftlab_run
  from ftlab.models import vgg
  from ftlab.plans import policies

  args.frameworks = [f.strip() for f in args.frameworks.split(',') if f.strip()]
  bad = [f for f in args.frameworks if f not in FRAMEWORKS]
  if bad or not args.frameworks:
    raise BenchError(f'unknown framework {bad}; valid: {",".join(FRAMEWORKS)}')
  args.dtypes = [d.strip() for d in args.dtype.split(',')]
  if any(d not in DTYPES for d in args.dtypes):
    raise BenchError(f'unknown dtype {args.dtype!r}; valid: {", ".join(DTYPES)}')
  if args.head not in BENCH_HEADS:
    raise BenchError(f'head {args.head!r} is not one of {", ".join(BENCH_HEADS)}')
  for name, value, low in (('batch', args.batch, 1), ('repeats', args.repeats, 1)):
    if value < low:
      raise BenchError(f'--{name} must be at least {low}, got {value}')
  if args.image_size < vgg.MIN_INPUT_SIZE:
    raise BenchError(f'--image-size must be at least {vgg.MIN_INPUT_SIZE}, got {args.image_size}')
  try:
    model = vgg.by_name(args.model, num_classes=args.num_classes, head=args.head, width=args.width)
    args.conv_lowering = ftlab_run.resolve_conv_lowering(args.conv_lowering)
    shapes = param_shapes(model, args.image_size)
    for plan_name in args.plans:
      cfg = policy_config(plan_name)
      if policies.check_policy_name(plan_name, cfg).schedule is not None:
        raise BenchError(f'{plan_name!r} is a schedule; bench the plans of its stages')
      if policies.needs_gradients(cfg):
        raise BenchError(f'{plan_name!r} chooses entries from training gradients; not benched')
      policies.make_plan(shapes, model.block_structure(), cfg)
  except InputError as e:
    raise BenchError(str(e).splitlines()[0]) from None
  if 'torch' in args.frameworks:
    try:
      import torch  # noqa: F401
    except ImportError:
      raise BenchError("torch is not installed; pip install -e '.[bench]'") from None
  if 'keras' in args.frameworks:
    try:
      import keras  # noqa: F401
    except ImportError:
      raise BenchError('keras is not installed') from None
  import jax

  if args.devices < 1 or args.devices > jax.local_device_count():
    raise BenchError(f'--devices {args.devices}: {jax.local_device_count()} local devices')
  if args.batch % args.devices:
    raise BenchError(f'--batch {args.batch} is not divisible by --devices {args.devices}')


def policy_config(name: str):
  from configs import default

  cfg = default.get_config().policy
  cfg.name = name
  return cfg


def param_shapes(model, image_size: int):
  import jax
  import jax.numpy as jnp

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']


def layer_program(depth: int, batch_norm: bool, width: float, head: str):
  """The network as (kind, name, size) steps, shared by the torch and Keras builders."""
  from ftlab.models import vgg

  steps = []
  for b, num_convs in enumerate(vgg.CONVS_PER_BLOCK[depth], start=1):
    for i in range(1, num_convs + 1):
      steps.append(('conv', f'block{b}_conv{i}', vgg.scaled(vgg.BLOCK_CHANNELS[b - 1], width)))
      if batch_norm:
        steps.append(('bn', f'block{b}_conv{i}_bn', None))
      steps.append(('relu', None, None))
    steps.append(('pool', None, None))
  if head == 'gap':
    steps.append(('gap', None, None))
  else:
    steps.append(('flatten', None, None))
    hidden = ('fc1', 'fc2') if head == 'imagenet' else ('fc',)  # the mlp head has one hidden layer
    units = vgg.IMAGENET_FC_UNITS if head == 'imagenet' else vgg.MLP_HEAD_UNITS
    for name in hidden:
      steps += [
        ('dense', name, vgg.scaled(units, width)),
        ('relu', None, None),
        ('dropout', None, None),
      ]
  steps.append(('dense', 'predictions', None))
  return steps


def layer_trainable(plan) -> dict[str, dict[str, bool]]:
  """{layer: {leaf: trains}} from the plan's leaf mask (a partly masked leaf counts as
  trainable: the other frameworks train it whole)."""
  from ftlab import paths

  out = {}
  for path, trains in paths.flatten(plan.trainable_mask).items():
    layer, leaf = path.split('/')
    out.setdefault(layer, {})[leaf] = bool(trains)
  return out


def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


class FtlabRunner:
  """ftlab's run-loop step for one dtype; `plan_step(plan)` compiles one plan's step."""

  def __init__(self, args, dtype):
    import jax
    import jax.numpy as jnp

    from ftlab import parallel
    from ftlab.models import vgg

    self.args = args
    self.model = vgg.by_name(
      args.model,
      num_classes=args.num_classes,
      head=args.head,
      width=args.width,
      dtype=jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32,
      conv_lowering=args.conv_lowering,
    )
    x = jnp.zeros((1, args.image_size, args.image_size, 3))
    self.variables = jax.jit(lambda: self.model.init(jax.random.key(0), x, train=False))()
    self.spread = parallel.Spread(devices=tuple(jax.local_devices()[: args.devices]))
    rng = np.random.default_rng(0)
    size = args.image_size
    host = {
      'image': rng.random((args.batch, size, size, 3), np.float32),
      'label': rng.integers(0, args.num_classes, args.batch).astype(np.int32),
    }
    self.batch = self.spread.shard(host)
    self.images = jax.device_put(host['image'], self.spread.devices[0])
    self.rng = jax.random.key(1)

  def forward(self) -> tuple[Callable[[], Any], dict]:
    import jax

    fn = jax.jit(functools.partial(self.model.apply, train=False))
    start = time.perf_counter()
    compiled = fn.lower(self.variables, self.images).compile()
    info = {'compile_sec': time.perf_counter() - start, 'flops': flops(compiled)}
    return lambda: jax.block_until_ready(compiled(self.variables, self.images)), info

  def plan_step(self, plan_name: str) -> tuple[Callable[[], Any], dict]:
    import jax

    from configs import default
    from ftlab import paths, train
    from ftlab.plans import optim, policies

    plan = policies.make_plan(
      self.variables['params'], self.model.block_structure(), policy_config(plan_name)
    )
    tx = optim.make(plan, default.get_config().optimizer, 1000)
    p_train_step, _ = train.compile_steps(self.spread, model=self.model, tx=tx, plan=plan)
    host_state = train.create_train_state(self.variables, tx)
    state = self.spread.replicate(host_state)
    start = time.perf_counter()
    compiled = p_train_step.lower(state, self.batch, self.rng).compile()
    compile_sec = time.perf_counter() - start
    trainable, total = policies.trainable_count(plan, self.variables['params'])
    nbytes = lambda tree: int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
    mask = paths.flatten(plan.trainable_mask)
    info = {
      'compile_sec': compile_sec,
      'step_flops': flops(compiled),
      'param_bytes': nbytes(self.variables['params']),
      'trainable_param_bytes': nbytes(
        [x for p, x in paths.flatten(self.variables['params']).items() if mask[p]]
      ),
      'opt_state_bytes': nbytes(host_state.opt_state),
      'trainable_params': int(trainable),
      'params': int(total),
      'plan': plan.name,
    }
    holder = {'state': state}

    def step():
      holder['state'], metrics = compiled(holder['state'], self.batch, self.rng)
      jax.block_until_ready(metrics)

    self.layers = layer_trainable(plan)
    self.frozen_layers = set(plan.frozen_layers)
    return step, info


def flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis['flops'])


class TorchRunner:
  """The same network in torch.nn (NCHW), SGD with momentum over the trainable tensors."""

  def __init__(self, args, dtype):
    import collections

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nn = torch.nn
    depth, batch_norm = int(args.model[3:5]), args.model.endswith('_bn')
    layers, channels = collections.OrderedDict(), 3
    features = None
    for i, (kind, name, size) in enumerate(layer_program(depth, batch_norm, args.width, args.head)):
      if kind == 'conv':
        layers[name] = nn.Conv2d(channels, size, 3, padding=1)
        channels = size
      elif kind == 'bn':
        layers[name] = nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5)
      elif kind == 'relu':
        layers[f'relu{i}'] = nn.ReLU()
      elif kind == 'pool':
        layers[f'pool{i}'] = nn.MaxPool2d(2)
      elif kind == 'gap':
        layers['gap'] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        features = channels
      elif kind == 'flatten':
        layers['flatten'] = nn.Flatten()
        features = channels * (args.image_size // 32) ** 2
      elif kind == 'dropout':
        layers[f'dropout{i}'] = nn.Dropout(0.5)
      elif kind == 'dense':
        size = size or args.num_classes
        layers[name] = nn.Linear(features, size)
        features = size
    # On a CUDA machine torch runs on the GPU too (when its wheel has CUDA).
    self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    self.torch, self.model = torch, nn.Sequential(layers).to(self.device)
    self.autocast = dtype == 'bfloat16'
    rng = np.random.default_rng(0)
    size = args.image_size
    images = rng.random((args.batch, 3, size, size), np.float32)
    self.images = torch.from_numpy(images).to(self.device)
    labels = rng.integers(0, args.num_classes, args.batch)
    self.labels = torch.from_numpy(labels).to(self.device)

  def _context(self):
    import contextlib

    if self.autocast:
      return self.torch.autocast(self.device, dtype=self.torch.bfloat16)
    return contextlib.nullcontext()

  def _sync(self):
    if self.device == 'cuda':
      self.torch.cuda.synchronize()

  def forward(self):
    def fn():
      self.model.eval()
      with self.torch.no_grad(), self._context():
        self.model(self.images)
      self._sync()

    return fn, {'device': self.device}

  def plan_step(self, layers: dict, frozen_layers: set):
    leaf = {'weight': ('kernel', 'scale'), 'bias': ('bias',)}
    trainable = []
    for name, param in self.model.named_parameters():
      layer, kind = name.split('.')
      trains = any(layers[layer].get(k, False) for k in leaf[kind])
      param.requires_grad_(trains)
      if trains:
        trainable.append(param)
    optimizer = self.torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    loss_fn = self.torch.nn.CrossEntropyLoss()

    def step():
      self.model.train()
      for name, module in self.model.named_children():
        if name in frozen_layers:  # frozen BatchNorm: running statistics
          module.eval()
      optimizer.zero_grad(set_to_none=True)
      with self._context():
        loss = loss_fn(self.model(self.images).float(), self.labels)
      loss.backward()
      optimizer.step()
      self._sync()

    return step, {'trainable_params': int(sum(p.numel() for p in trainable))}


class KerasRunner:
  """The same network with Keras layers (TensorFlow backend), a `tf.function` step."""

  def __init__(self, args, dtype):
    os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
    import keras
    import tensorflow as tf

    self.tf, self.keras = tf, keras
    keras.mixed_precision.set_global_policy('mixed_bfloat16' if dtype == 'bfloat16' else 'float32')
    depth, batch_norm = int(args.model[3:5]), args.model.endswith('_bn')
    layers = keras.layers
    inputs = keras.Input((args.image_size, args.image_size, 3))
    x = inputs
    for kind, name, size in layer_program(depth, batch_norm, args.width, args.head):
      if kind == 'conv':
        x = layers.Conv2D(size, 3, padding='same', name=name)(x)
      elif kind == 'bn':
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)
      elif kind == 'relu':
        x = layers.ReLU()(x)
      elif kind == 'pool':
        x = layers.MaxPooling2D(2)(x)
      elif kind == 'gap':
        x = layers.GlobalAveragePooling2D()(x)
      elif kind == 'flatten':
        x = layers.Flatten()(x)
      elif kind == 'dropout':
        x = layers.Dropout(0.5)(x)
      elif kind == 'dense':
        kw = {'dtype': 'float32'} if name == 'predictions' else {}
        x = layers.Dense(size or args.num_classes, name=name, **kw)(x)
    self.model = keras.Model(inputs, x)
    keras.mixed_precision.set_global_policy('float32')
    rng = np.random.default_rng(0)
    size = args.image_size
    self.images = tf.constant(rng.random((args.batch, size, size, 3), np.float32))
    self.labels = tf.constant(rng.integers(0, args.num_classes, args.batch))

  def forward(self):
    fn = self.tf.function(lambda x: self.model(x, training=False), jit_compile=False)
    return lambda: fn(self.images).numpy(), {}

  def plan_step(self, layers: dict, frozen_layers: set):
    leaf = {'kernel': 'kernel', 'bias': 'bias', 'gamma': 'scale', 'beta': 'bias'}
    trainable = []
    for layer in self.model.layers:
      # A frozen layer (a frozen BatchNorm runs on its running statistics).
      layer.trainable = layer.name not in frozen_layers and bool(layer.weights)
      for var in layer.trainable_weights:
        kind = var.path.split('/')[-1]
        if layers.get(layer.name, {}).get(leaf.get(kind, ''), False):
          trainable.append(var)
    optimizer = self.keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(trainable)
    loss_fn = self.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tf = self.tf

    @tf.function(jit_compile=False)
    def train_step(images, labels):
      with tf.GradientTape() as tape:
        loss = loss_fn(labels, self.model(images, training=True))
      optimizer.apply_gradients(zip(tape.gradient(loss, trainable), trainable))
      return loss

    step = lambda: train_step(self.images, self.labels).numpy()
    return step, {'trainable_params': int(sum(int(np.prod(v.shape)) for v in trainable))}


RUNNERS = {'ftlab': FtlabRunner, 'torch': TorchRunner, 'keras': KerasRunner}


def summary(times: list[float], batch: int) -> dict:
  q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
  median = statistics.median(times)
  return {
    'times_sec': times,
    'median_sec': median,
    'min_sec': min(times),
    'max_sec': max(times),
    'iqr_sec': q3 - q1,
    'images_per_sec': batch / median,
  }


def paired_ratio(a: list[float], b: list[float]) -> float:
  """Median over repeats of a[i] / b[i] (both timed in the same repeat)."""
  return statistics.median(x / y for x, y in zip(a, b))


def bench_dtype(args, dtype: str) -> dict:
  """Every plan x framework at one dtype: step and forward times, ratios, ftlab's costs."""
  runners = {}
  for fw in args.frameworks:
    start = time.perf_counter()
    runners[fw] = RUNNERS[fw](args, dtype)
    print(f'[{dtype}] {fw}: model built in {time.perf_counter() - start:.1f}s', flush=True)
  forwards, forward = {}, {}
  for fw, runner in runners.items():
    fn, info = runner.forward()
    info['first_call_sec'] = timed(fn)  # tracing / first-call costs of torch and TF
    forwards[fw], forward[fw] = fn, {**info, 'times_sec': []}
  plans = {}
  for plan_name in args.plans:
    steps, row = {}, {}
    ftlab_layers = None
    for fw, runner in runners.items():
      if fw == 'ftlab':
        steps[fw], row[fw] = runner.plan_step(plan_name)
        ftlab_layers = (runner.layers, runner.frozen_layers)
      else:
        if ftlab_layers is None:
          ftlab_layers = plan_layers(args, plan_name)
        steps[fw], row[fw] = runner.plan_step(*ftlab_layers)
      row[fw]['first_call_sec'] = timed(steps[fw])
      for _ in range(args.warmup - 1):
        steps[fw]()
    times = {fw: [] for fw in runners}
    fwd_times = {fw: [] for fw in runners}
    for _ in range(args.repeats):
      for fw in runners:  # interleaved: a slow moment hits every framework alike
        times[fw].append(timed(steps[fw]))
        fwd_times[fw].append(timed(forwards[fw]))
    for fw in runners:
      row[fw].update(summary(times[fw], args.batch))
      row[fw]['step_over_own_forward'] = paired_ratio(times[fw], fwd_times[fw])
      if fw != 'torch' and 'torch' in runners:
        row[fw]['step_over_torch'] = paired_ratio(times[fw], times['torch'])
      forward[fw]['times_sec'] += fwd_times[fw]
    plans[plan_name] = row
    print(format_plan_line(plan_name, row), flush=True)
  for fw in runners:
    forward[fw].update(summary(forward[fw]['times_sec'], args.batch))
  return {'forward': forward, 'plans': plans}


def plan_layers(args, plan_name: str):
  """The plan's per-layer mask without ftlab's runner (torch/Keras-only runs)."""
  from ftlab.models import vgg
  from ftlab.plans import policies

  model = vgg.by_name(args.model, num_classes=args.num_classes, head=args.head, width=args.width)
  plan = policies.make_plan(
    param_shapes(model, args.image_size), model.block_structure(), policy_config(plan_name)
  )
  return layer_trainable(plan), set(plan.frozen_layers)


def format_plan_line(plan_name: str, row: dict) -> str:
  parts = [f'{fw} {r["median_sec"] * 1e3:.0f} ms' for fw, r in row.items()]
  return f'{plan_name}: ' + ', '.join(parts)


def markdown_table(result: dict) -> str:
  """The README table: per dtype, plan and framework, the step's median time and ratios."""
  cfg = result['config']
  lines = [
    f'{cfg["model"]} (width {cfg["width"]:g}, `{cfg["head"]}` head), {cfg["image_size"]} px, '
    f'batch {cfg["batch"]}, {cfg["cpu_count"]} CPU cores ({cfg["platform"]}), '
    f'{cfg["repeats"]} interleaved repeats; ftlab on {cfg["devices"]} device(s), '
    f'conv lowering `{cfg["conv_lowering"]}`; torch/TF threads {cfg["threads"]}.',
    '',
    '| dtype | plan | framework | step ms, median (min–max) | images/s | ÷ torch step |'
    ' ÷ own forward | step GFLOPs (XLA) |',
    '|---|---|---|---:|---:|---:|---:|---:|',
  ]
  fmt = lambda x, f: '' if x is None else format(x, f)
  for dtype, res in result['results'].items():
    rows = [('forward (inference)', res['forward'])] + list(res['plans'].items())
    for plan_name, row in rows:
      for fw, r in row.items():
        flops_value = r.get('step_flops', r.get('flops'))
        lines.append(
          f'| {dtype} | `{plan_name}` | {fw} | {r["median_sec"] * 1e3:,.0f} '
          f'({r["min_sec"] * 1e3:,.0f}–{r["max_sec"] * 1e3:,.0f}) | {r["images_per_sec"]:,.1f} | '
          f'{fmt(r.get("step_over_torch"), ".2f")} | {fmt(r.get("step_over_own_forward"), ".2f")}'
          f' | {fmt(flops_value and flops_value / 1e9, ".3g")} |'
        )
  return '\n'.join(lines)


def rewrite_readme(path: str, table: str) -> None:
  """Replaces the text between the bench-results markers of `path` with `table`."""
  try:
    readme_section.replace(path, (README_START, README_END), table)
  except readme_section.ReadmeError as e:
    raise BenchError(str(e)) from None


def run(args) -> dict:
  import jax

  result = {
    'config': {
      'model': args.model,
      'width': args.width,
      'head': args.head,
      'num_classes': args.num_classes,
      'image_size': args.image_size,
      'batch': args.batch,
      'plans': args.plans,
      'frameworks': args.frameworks,
      'dtypes': args.dtypes,
      'repeats': args.repeats,
      'warmup': args.warmup,
      'threads': args.threads,
      'devices': args.devices,
      'device_kind': jax.local_devices()[0].device_kind,
      'backend': jax.default_backend(),
      'conv_lowering': args.conv_lowering,  # resolved for the backend by check_args
      'cpu_count': os.cpu_count(),
      'platform': platform.processor() or platform.machine(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'optimizer': 'sgd, lr 0.01, momentum 0.9',
    },
    'results': {},
  }
  for dtype in args.dtypes:
    result['results'][dtype] = bench_dtype(args, dtype)
  result['config']['versions'] = {
    m: sys.modules[m].__version__
    for m in ('jax', 'torch', 'tensorflow', 'keras')
    if m in sys.modules
  }
  return result


def main(argv: list[str] | None = None) -> int:
  try:
    args = parse_args(argv)
    check_args(args)
  except BenchError as e:
    print(f'bench.py: error: {e}', file=sys.stderr)
    return 2
  if args.report_only:
    with open(args.report_only) as f:
      result = json.load(f)
  else:
    result = run(args)
    if args.json:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json, 'w') as f:
        json.dump(result, f, indent=1)
  table = markdown_table(result)
  print(table)
  if args.readme:
    try:
      rewrite_readme(args.readme, table)
    except BenchError as e:
      print(f'bench.py: error: {e}', file=sys.stderr)
      return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
