"""Spreading a per-device step over devices: `pmap` or `shard_map` over a 1-D mesh.

The per-device step is written once, with collectives over the axis `'batch'`
(`lax.pmean(x, 'batch')`). A `Spread` compiles it for one of two modes and moves
data to match:

- `shard_map` (default): `jax.jit` over a `jax.shard_map` on a mesh with one axis `'batch'`
  of every process's devices; replicated values are global arrays with a replicated sharding
  and the batch keeps its shape `[B, ...]`, sharded along its first dimension. This is JAX's
  recommended way to write a per-device program (`jax.pmap`'s docstring: "Old way of doing
  parallel map. Use jax.shard_map instead."), and the one that composes with other shardings.
- `pmap`: arrays carry a leading device axis; replicated values are stacked copies and a
  global batch `[B, ...]` becomes `[D, B / D, ...]`. Kept for comparison and for code that
  expects pmap's layout (since jax 0.8 pmap is itself jit + shard_map underneath).

Both give the same numbers bit for bit (tests/test_train.py); only the layout of the arrays
differs, and the `replicate` / `shard` / `unreplicate` methods hide it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab.errors import ConfigError

# The one axis name: the steps' collectives, BatchNorm's `axis_name` and the mesh all use it,
# so a step written for pmap runs unchanged under shard_map.
AXIS = 'batch'
MODES = ('pmap', 'shard_map')
# How each step argument is laid out over devices.
REPLICATED = 'replicated'  # the same value on every device (the train state)
SHARDED = 'sharded'  # split along the first dimension (the batch)
BROADCAST = 'broadcast'  # a small value passed as is to every device (an rng key)
KINDS = (REPLICATED, SHARDED, BROADCAST)


def initialize_distributed(multi_host: bool) -> None:
  """Joins a multi-process job: from `scripts/launch_local.py`'s environment, or else (when
  `multi_host`) from the cluster's (TPU pod, SLURM) via `jax.distributed.initialize()`."""
  if 'FTLAB_NUM_PROCESSES' in os.environ:
    if jax.config.jax_platforms in (None, '', 'cpu'):
      # CPU collectives across processes need gloo.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=os.environ['FTLAB_COORDINATOR_ADDRESS'],
      num_processes=int(os.environ['FTLAB_NUM_PROCESSES']),
      process_id=int(os.environ['FTLAB_PROCESS_ID']),
    )
    _connect_devices()
  elif multi_host:
    try:
      # No arguments: JAX reads the cluster's environment (SLURM, Open MPI, TPU pods, GKE).
      jax.distributed.initialize()
    except ValueError as e:  # the one call: JAX found no cluster to take a coordinator from
      raise ConfigError(
        f'multi_host=True, but this machine is in no cluster JAX can join ({e}); set '
        'multi_host=False to run on this machine, or start one process per host under SLURM, '
        'Open MPI or a TPU pod (scripts/launch_local.py runs several on one machine)'
      ) from None


def _connect_devices() -> None:
  """Forms the job's Gloo connections while the processes are in step.

  Gloo connects the devices of a collective at its first use and gives every process a fixed
  30 s to arrive (XLA sets no timeout there). At the first train step one process can be further
  behind than that on a busy machine (its compile): seen as "Gloo context initialization failed
  ... 29.99999994s" at the first step of a 2 x 4 run beside two CPU burners. Just after
  `jax.distributed.initialize` has brought the processes together, two tiny collectives form
  the groups the run uses and reuses: every device (the steps' sums over the `'batch'` axis)
  and each device with its peers (`multihost_utils`' gathers, Orbax's barriers).

  Raises:
    RuntimeError: the sum over the devices is not their number (a broken connection).
  """
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  ones = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P(AXIS)), np.ones(jax.local_device_count(), np.float32)
  )
  count = jax.jit(
    jax.shard_map(lambda x: jax.lax.psum(x, AXIS), mesh=mesh, in_specs=P(AXIS), out_specs=P())
  )(ones)
  found = float(np.asarray(count.addressable_shards[0].data)[0])
  if found != jax.device_count():
    raise RuntimeError(f'a sum of ones over {jax.device_count()} devices gave {found}')
  multihost_utils.sync_global_devices('ftlab: connect every device')


class PreemptionNotice:
  """Whether the job was asked to stop (SIGTERM or SIGINT), agreed by every process at one step.

  One process: the signal is recorded by a Python handler and seen at the next `reached`.
  Several processes (`jax.distributed`): a SIGTERM to any one of them is caught by JAX's
  preemption service (TSL's SIGTERM notifier, installed by `jax.distributed.initialize`),
  which tells the coordination service; `multihost_utils.reached_preemption_sync_point`
  then answers True on every process at the same step (the largest step any process has
  reported, plus one), so all write one checkpoint of that step and stop. The agreement
  goes through the coordinator, not through files. A SIGINT is turned into a SIGTERM to the
  process itself, so it reaches the job the same way.

  Use as a context manager (handlers are installed on entry, from the main thread only) and
  call `reached(step)` after every step, on every process, from the run's first step on.
  """

  def __init__(self):
    self.received: list[int] = []
    self._previous: dict[int, Any] = {}
    # Without JAX's preemption service (jax_enable_preemption_service=False) each process
    # only sees its own signals, as a single process would.
    self._job_wide = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

  def reached(self, step: int) -> int | None:
    """The signal number if the job stops after `step` (every process gets the same answer)."""
    if self._job_wide:
      return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
    return self.received[0] if self.received else None

  def _record(self, signum, frame):
    del frame
    logging.warning(
      '%s received: finishing the step, then checkpointing', signal.Signals(signum).name
    )
    # Only recorded: the handler runs between Python bytecodes, possibly mid-step, and a
    # checkpoint must wait until the step's state is whole.
    self.received.append(signum)

  def _forward(self, signum, frame):
    del frame
    logging.warning('%s received: passed to the job as SIGTERM', signal.Signals(signum).name)
    os.kill(os.getpid(), signal.SIGTERM)

  def __enter__(self) -> PreemptionNotice:
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be installed from the main thread
    if self._job_wide:  # SIGTERM stays with JAX's preemption service
      self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._forward)}
    else:
      self._previous = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def check_divisible(global_batch: int, num_devices: int) -> None:
  """Raises ConfigError unless the global batch splits evenly over the devices."""
  if global_batch % num_devices:
    lower = global_batch - global_batch % num_devices
    raise ConfigError(
      f'global batch size {global_batch} is not divisible by {num_devices} devices; '
      f'use a multiple of {num_devices} (e.g. {max(lower, num_devices)} or '
      f'{lower + num_devices})'
    )


@dataclasses.dataclass(frozen=True)
class Spread:
  """A way of running a per-device step over `devices`.

  Attributes:
    mode: `pmap` or `shard_map`.
    devices: the devices, in mesh order.
  """

  mode: str = 'shard_map'
  devices: tuple = ()

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f'unknown parallelism {self.mode!r}; valid: {", ".join(MODES)}')
    # `object.__setattr__` because the dataclass is frozen (hashable, safe to share).
    if not self.devices:  # every process's devices: one data-parallel group over all hosts
      object.__setattr__(self, 'devices', tuple(jax.devices()))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @functools.cached_property
  def local_devices(self) -> tuple:
    """This process's devices, in mesh order."""
    return tuple(d for d in self.devices if d.process_index == jax.process_index())

  @functools.cached_property
  def mesh(self) -> Mesh:
    return Mesh(np.array(self.devices), (AXIS,))

  def replicate(self, tree: Any) -> Any:
    """Places a copy of `tree` on every device, in this mode's layout.

    Every process passes the same value. The copy goes through the host, so it never
    aliases the caller's arrays (the step donates the state; the loaded weights survive).
    """
    host = jax.device_get(tree)
    if self.mode == 'pmap':
      # pmap's layout as a global array: a leading device axis, one row per device, so the
      # result feeds `jax.pmap` directly and works across processes (each places its own rows).
      sharding = NamedSharding(self.mesh, P(AXIS))
      return jax.tree.map(
        lambda x: jax.make_array_from_single_device_arrays(
          (self.num_devices,) + np.shape(x),
          sharding,
          [jax.device_put(np.asarray(x)[None], d) for d in self.local_devices],
        ),
        host,
      )
    sharding = NamedSharding(self.mesh, P())
    return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
      host,
    )

  def unreplicate(self, tree: Any) -> Any:
    """The single copy of a replicated `tree` (e.g. the state or metrics after a step)."""
    if self.mode == 'pmap':
      # The first local copy: every device holds the same values, and reading one shard needs no
      # cross-process transfer (a multi-host global array cannot be fetched whole).
      return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)
    return tree

  def shard(self, batch: Any) -> Any:
    """Splits this process's batch `{name: [b, ...]}` over its devices.

    With P processes each passes its own b = B / P examples; together they form the
    global batch B (in the `shard_map` layout, one global array of shape [B, ...]).

    Raises:
      ValueError: B is not divisible by the number of devices.
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(f'batch arrays disagree on the batch size: {sorted(sizes)}')
    local = sizes.pop()
    # Every process passes the same local size (`BatchOrder.local_batch`), so the global batch
    # is the local one times the process count.
    check_divisible(local * jax.process_count(), self.num_devices)
    sharding = NamedSharding(self.mesh, P(AXIS))
    if self.mode == 'pmap':
      # The local rows split over the local devices in order: device i of this process gets the
      # i-th contiguous slice, matching the global array's row order.
      per_device = (len(self.local_devices), -1)
      return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
          sharding, np.reshape(x, per_device + np.shape(x)[1:])
        ),
        batch,
      )
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def compile(
    self, step_fn: Callable, *, in_kinds: Sequence[str], donate_argnums: Sequence[int] = ()
  ) -> Callable:
    """Compiles a per-device step over the devices.

    Args:
      step_fn: per-device function using collectives over axis `'batch'`; its outputs must
        be the same on every device (e.g. pmean-ed), so they come back replicated.
      in_kinds: one of `replicated`, `sharded`, `broadcast` per positional argument.
      donate_argnums: arguments whose buffers the step may reuse (the state).

    Returns:
      The compiled step; feed it `replicate`d and `shard`ed arguments.
    """
    bad = [k for k in in_kinds if k not in KINDS]
    if bad:
      raise ValueError(f'unknown argument kinds {bad}; valid: {", ".join(KINDS)}')
    if self.mode == 'pmap':
      return jax.pmap(
        step_fn,
        axis_name=AXIS,
        devices=self.devices,
        in_axes=tuple(None if k == BROADCAST else 0 for k in in_kinds),
        donate_argnums=tuple(donate_argnums),
      )
    # out_specs=P(): the outputs are the same on every device (pmean-ed or gathered), so they
    # come back as replicated global arrays, as `unreplicate` expects.
    specs = tuple(P(AXIS) if k == SHARDED else P() for k in in_kinds)
    # check_vma=False keeps shard_map's autodiff from inserting its own psum for gradients
    # of replicated inputs: the step averages them itself, exactly as under pmap.
    mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=specs, out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=tuple(donate_argnums))


def in_dispatch_order(outputs: Any) -> Any:
  """`outputs`, waited for in a multi-process run on CPUs; elsewhere returned at once.

  Call it on each output of a loop that dispatches programs which do not depend on each other
  but hold cross-process collectives (the eval steps of one evaluation all read the same
  state). XLA's CPU runtime may run such programs in another order than they were dispatched,
  and then a process's collective (gloo) meets another program's on the other process: the
  suspected cause of 2 x 4 CPU jobs that stopped making progress inside an evaluation under
  load (README, "Where it is tested"; never inside training, whose steps depend on each other
  through the state). Waiting keeps every process's collectives in dispatch order. On GPU and
  TPU a device runs its programs in order, and one process has no cross-process collectives:
  nothing waits there.
  """
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    jax.block_until_ready(outputs)
  return outputs


def prefetch_to_devices(batches: Iterator[Any], spread: Spread, size: int = 2) -> Iterator[Any]:
  """Shards host batches onto the devices `size` batches ahead of their use.

  `jax.device_put` is asynchronous, so the transfer of the next batches overlaps the
  current step.
  """
  # Two batches ahead is enough to hide the host-to-device copy behind a step; more only
  # holds more device memory.
  queue = collections.deque()
  for batch in batches:
    queue.append(spread.shard(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def collect(
  p_step: Callable,
  state: Any,
  spread: Spread,
  batches: Iterator[dict],
  positions: Callable[[int], np.ndarray],
  size: int,
) -> dict[str, np.ndarray]:
  """The per-example outputs of a gathering step over a split's padded batches, in split order.

  Args:
    p_step: `p_step(state, batch)` -> `{name: [global batch, ...], 'mask': [global batch]}`,
      gathered over the devices (`lax.all_gather(..., tiled=True)`), so every process has all.
    state: its first argument (replicated).
    spread: the `Spread` it was compiled for.
    batches: this process's padded host batches.
    positions: `k -> [global batch]` split positions of batch k's gathered rows, -1 for
      padding (`input_pipeline.gathered_positions`).
    size: examples in the split.

  Returns:
    `{name: [size, ...]}` for every output but the mask.

  Raises:
    ValueError: the batches did not cover every example once.
  """
  found, filled = {}, 0
  for k, batch in enumerate(batches):
    out = jax.device_get(spread.unreplicate(p_step(state, spread.shard(batch))))
    where = positions(k)
    # Padding is marked twice (the batch's mask, and -1 from `positions`' arithmetic); should
    # the two disagree, the count check below says so instead of a row being overwritten.
    real = (out.pop('mask') > 0) & (where >= 0)
    for name, value in out.items():
      if name not in found:
        found[name] = np.zeros((size,) + value.shape[1:], value.dtype)
      found[name][where[real]] = value[real]
    filled += int(real.sum())
  if filled != size:
    raise ValueError(f'{filled} of {size} examples computed')
  return found


def compiled_costs(compiled_fn: Callable, *args: Any) -> dict:
  """XLA's cost and memory analyses of the program `compiled_fn(*args)` runs.

  Args:
    compiled_fn: a jitted or pmapped function (it has `.lower`).
    *args: what it is called with (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    `{'flops': float, 'memory': {...}}`. `memory` is per device, in bytes, from
    `Compiled.memory_analysis()`: `arguments`, `outputs`, `temps` (XLA's scratch buffers),
    `aliased` (outputs written over donated arguments) and `total` = arguments + outputs −
    aliased + temps, what the program needs at once in the worst case (XLA may reuse temps, so
    this is an upper bound on its peak). Code size is left out.
  """
  # A separate lowering and compile: the numbers are those of the program the step runs, but
  # recording them costs one more compilation (a hit in the persistent compilation cache when
  # one is configured).
  compiled = compiled_fn.lower(*args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
    analysis = analysis[0]
  stats = compiled.memory_analysis()
  memory = {
    'arguments': int(stats.argument_size_in_bytes),
    'outputs': int(stats.output_size_in_bytes),
    'temps': int(stats.temp_size_in_bytes),
    'aliased': int(stats.alias_size_in_bytes),
  }
  memory['total'] = memory['arguments'] + memory['outputs'] - memory['aliased'] + memory['temps']
  return {'flops': float(analysis['flops']), 'memory': memory}


def compiled_flops(compiled_fn: Callable, *args: Any) -> float:
  """FLOPs of `compiled_fn(*args)` from XLA's cost analysis of the compiled program."""
  return compiled_costs(compiled_fn, *args)['flops']
