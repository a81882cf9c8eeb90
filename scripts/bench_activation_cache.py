"""Epoch time of a linear probe with and without the frozen-prefix activation cache.

  python scripts/bench_activation_cache.py [--model vgg16] [--width 1.0] [--image-size 32] \
      [--batch 64] [--examples 640] [--policy linear_probe] [--json OUT.json]

Trains on the first `--examples` images of Fashion-MNIST's training split (local files), as
the run loop does: host batches from the input pipeline, sharded onto every device, one
compiled train step, one stream of batches per run. Uncached: one epoch timed after a warm-up
step (every epoch costs the same). Cached: the cache build, then the first epoch (with the
step's compile) and the second, each timed. Prints the
ratio of epoch times after the first and, with --json, writes every figure.
"""

import argparse
import dataclasses
import itertools
import json
import time

import jax
from ml_collections import ConfigDict

from configs import default
from ftlab import activation_cache, parallel, run, train
from ftlab.models import vgg
from ftlab.plans import optim, policies


def timed_epoch(p_train_step, state, batches, steps, rng):
  """`steps` steps as the run loop takes them, from one stream of device batches."""
  start = time.perf_counter()
  for batch in itertools.islice(batches, steps):
    state, metrics = p_train_step(state, batch, rng)
  jax.block_until_ready(metrics)
  return state, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='vgg16')
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--head', default='gap')
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--examples', type=int, default=640)
  parser.add_argument('--policy', default='linear_probe')
  parser.add_argument('--workdir', default='/tmp/bench_activation_cache')
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  config = default.get_config()
  config.dataset.train_split = f'train[:{args.examples}]'
  config.dataset.image_size = args.image_size
  config.dataset.augment = 'none'
  config.batch_size = config.eval_batch_size = args.batch
  config.activation_cache = 'memory'
  data = run.make_data(config)
  steps = data.train.num_examples // args.batch
  lowering = run.resolve_conv_lowering('auto')
  model = vgg.by_name(
    args.model, num_classes=10, head=args.head, width=args.width, conv_lowering=lowering
  )
  x = jax.numpy.zeros((1, args.image_size, args.image_size, 3))
  variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  plan = policies.make_plan(
    variables['params'], model.block_structure(), ConfigDict({'name': args.policy})
  )
  tx = optim.make(plan, config.optimizer, 10 * steps)
  spread = parallel.Spread()
  rng = jax.random.key(1)

  p_train_step, _ = train.compile_steps(spread, model=model, tx=tx, plan=plan)
  state = spread.replicate(train.create_train_state(variables, tx))
  batches = parallel.prefetch_to_devices(data.train_batches(0), spread)
  state, warmup = timed_epoch(p_train_step, state, batches, 1, rng)  # compile
  state, uncached = timed_epoch(p_train_step, state, batches, steps, rng)

  start = time.perf_counter()
  train_only = dataclasses.replace(data, evals={})  # the bench times training epochs only
  prepared = activation_cache.prepare(
    'memory', model, plan, variables, spread, train_only, directory=args.workdir
  )
  build = time.perf_counter() - start
  p_train_step, _ = train.compile_steps(spread, model=prepared.model, tx=tx, plan=plan)
  state = spread.replicate(train.create_train_state(variables, tx))
  batches = parallel.prefetch_to_devices(prepared.train_batches(0), spread)
  state, first = timed_epoch(p_train_step, state, batches, steps, rng)
  state, second = timed_epoch(p_train_step, state, batches, steps, rng)
  result = {
    'model': args.model,
    'width': args.width,
    'head': args.head,
    'image_size': args.image_size,
    'global_batch': args.batch,
    'devices': spread.num_devices,
    'steps_per_epoch': steps,
    'policy': args.policy,
    'cache_starts_at': prepared.start,
    'uncached_compile_and_first_step_sec': warmup,
    'uncached_epoch_sec': uncached,
    'cache_build_sec': build,
    'cached_first_epoch_sec': first,
    'cached_second_epoch_sec': second,
    'speedup_epoch_after_first': uncached / second,
  }
  for k, v in result.items():
    print(f'{k}: {v:.4g}' if isinstance(v, float) else f'{k}: {v}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
