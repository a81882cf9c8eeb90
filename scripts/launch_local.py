"""Runs N copies of a command on this machine as one multi-process JAX job.

  python scripts/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      .venv/bin/python -m ftlab.main --config configs/default.py:runlocal --workdir W

Each copy gets `FTLAB_COORDINATOR_ADDRESS` (a free loopback port), `FTLAB_NUM_PROCESSES` and
`FTLAB_PROCESS_ID`, which `ftlab.parallel.initialize_distributed` hands to
`jax.distributed.initialize`, `devices_per_process` fake CPU devices, and a collective timeout
of `--collective_timeout` seconds (XLA's default, 30 s, is shorter than one process's compile
may take when the machine is busy). Output is streamed
with a `[pI]` prefix. When one copy fails, the others are stopped (SIGTERM, then SIGKILL) and
the launcher exits with the failed copy's code; `--timeout` ends a stuck launch the same way,
after a SIGUSR1 to each copy (`ftlab.main` then prints every thread's Python stack: where each
process was waiting).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10  # between SIGTERM and SIGKILL when stopping the others
STACKS_SECONDS = 3  # for the copies to print their stacks (SIGUSR1) before a timed-out stop
# XLA's CPU collectives (gloo) give the processes 30 s to meet at a collective; the first one
# waits while every process compiles its step, which on a busy 2-core machine can take longer
# for one process than the other (the suite under two CPU burners ended in DEADLINE_EXCEEDED).
# Gloo's own 30 s to connect a group at its first use is not this flag's: `ftlab.parallel`
# connects every group at start, while the processes are in step.
COLLECTIVE_TIMEOUT_SECONDS = 600


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def stream(proc: subprocess.Popen, prefix: str) -> None:
  for line in proc.stdout:
    sys.stdout.write(f'{prefix} {line}')
    sys.stdout.flush()


def stop(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + GRACE_SECONDS
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def dump_stacks(procs: list[subprocess.Popen]) -> None:
  """Asks every running copy for its Python stacks (printed to its stderr, which is streamed)."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGUSR1)
  time.sleep(STACKS_SECONDS)


def describe(code: int) -> str:
  return f'signal {signal.Signals(-code).name}' if code < 0 else f'exit code {code}'


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--timeout', type=float, default=3600, help='seconds for the whole launch')
  parser.add_argument(
    '--collective_timeout',
    type=int,
    default=COLLECTIVE_TIMEOUT_SECONDS,
    help='seconds a CPU collective waits for the other processes (XLA default: 30)',
  )
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command')
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command or args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('need --num_processes >= 1, --devices_per_process >= 1 and -- COMMAND')
  address = f'127.0.0.1:{free_port()}'
  procs, threads = [], []
  for i in range(args.num_processes):
    env = dict(
      os.environ,
      FTLAB_COORDINATOR_ADDRESS=address,
      FTLAB_NUM_PROCESSES=str(args.num_processes),
      FTLAB_PROCESS_ID=str(i),
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices_per_process} '
      f'--xla_cpu_collective_timeout_seconds={args.collective_timeout}',
    )
    p = subprocess.Popen(
      command,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    procs.append(p)
    print(f'launch_local: started process {i} (pid {p.pid}) of {args.num_processes}', flush=True)
    threads.append(threading.Thread(target=stream, args=(p, f'[p{i}]'), daemon=True))
    threads[-1].start()
  deadline = time.time() + args.timeout
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(
          f'launch_local: process {i} ended with {describe(code)}; stopping the others',
          file=sys.stderr,
          flush=True,
        )
        stop(procs)
        return code if code > 0 else 128 - code
      if all(c == 0 for c in codes):
        return 0
      if time.time() > deadline:
        print(
          f'launch_local: timed out after {args.timeout:g} s; their stacks, then stopping all '
          'processes',
          file=sys.stderr,
          flush=True,
        )
        dump_stacks(procs)
        stop(procs)
        return 124
      time.sleep(0.1)
  except KeyboardInterrupt:
    stop(procs)
    return 130
  finally:
    for t in threads:
      t.join(timeout=5)


if __name__ == '__main__':
  sys.exit(main())
