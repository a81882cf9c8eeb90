"""Runs as subprocesses, N at a time, each with its share of the GPUs or cores.

What `scripts/study.py --workers N` (and `--isolate`) launches its runs with: every run is its
own process, writing its output to `RUN/log.txt` and its command, exit code and seconds to
`RUN/process.json`, so a run that crashes or diverges is marked failed and the others go on.
On a CUDA machine each worker gets its share of the GPUs (`CUDA_VISIBLE_DEVICES`, and a
memory fraction when several share one); on a CPU, its share of the cores (CPU affinity and
`OMP_NUM_THREADS`). Run directories may be on an object store (gs://): the output is then
collected and appended to the log object when the run ends (an object is written whole).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time

from ftlab.files import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_RECORD = 'process.json'  # a launched run's command, exit code and seconds
LOG = 'log.txt'


@dataclasses.dataclass(frozen=True)
class Launch:
  """One run to launch: its command line, its directory and its name in progress lines."""

  argv: list[str]
  directory: str
  name: str


def read_json(path: str) -> dict:
  """The JSON object at `path` (local or gs://); {} when it is absent or half-written."""
  try:
    return json.loads(storage.path(path).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else ''


def returncode(directory: str) -> int | None:
  """The exit code recorded for the run launched in `directory`; None if none finished."""
  return read_json(os.path.join(directory, PROCESS_RECORD)).get('returncode')


def worker_slots(workers: int, gpus: list[str]) -> list[tuple[dict, list[int] | None]]:
  """Each worker's environment and CPU set: its share of the GPUs, or else of the cores.

  Args:
    workers: runs at a time (>= 1).
    gpus: the CUDA device ids to hand out (`visible_gpus()`); [] on a CPU machine.

  Returns:
    One `(environment, cpus)` per worker; `cpus` None means every CPU of this process.
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.getenv('PYTHONPATH')])))
  if workers == 1:
    return [(env, None)]

  def share(items, i):  # the i-th of `workers` contiguous shares, or one item if too few
    part = items[i * len(items) // workers : (i + 1) * len(items) // workers]
    return part or [items[i % len(items)]]

  if not gpus:
    cores = sorted(os.sched_getaffinity(0))
    return [
      (dict(env, OMP_NUM_THREADS=str(len(share(cores, i)))), share(cores, i))
      for i in range(workers)
    ]
  per_gpu = -(-workers // len(gpus))  # several runs on one GPU must share its memory
  memory = {'XLA_PYTHON_CLIENT_MEM_FRACTION': f'{0.9 / per_gpu:.2f}'} if per_gpu > 1 else {}
  return [
    (dict(env, CUDA_VISIBLE_DEVICES=','.join(share(gpus, i)), **memory), None)
    for i in range(workers)
  ]


def visible_gpus() -> list[str]:
  """The CUDA devices this process may hand out (none on a machine without nvidia-smi)."""
  if 'CUDA_VISIBLE_DEVICES' in os.environ:
    return [g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g.strip() not in ('', '-1')]
  query = ['nvidia-smi', '--query-gpu=index', '--format=csv,noheader']
  out = shutil.which(query[0]) and subprocess.run(query, capture_output=True, text=True)
  return out.stdout.split() if out and out.returncode == 0 else []


def _status(directory: str, code: int, seconds: float) -> str:
  summary = read_json(os.path.join(directory, 'summary.json'))
  if code == 0 and 'final_eval_accuracy' in summary:
    return f'test accuracy {summary["final_eval_accuracy"]:.4f}, {seconds:.0f} s'
  text = storage.path(os.path.join(directory, LOG)).read_text()
  log = os.path.join(directory, LOG)
  return f'FAILED (exit {code}): {last_line(text[-2000:])} (log: {log})'


def run_all(launches: list[Launch], workers: int = 1) -> list[int]:
  """Runs `launches`, `workers` at a time (each with its share: `worker_slots`); prints a line
  per finished run (`[k/n] name: ...`, `FAILED (exit c)` for a failure) and returns the exit
  codes in order.

  On SIGINT (or a SIGTERM the caller turned into KeyboardInterrupt) each running run is sent
  SIGTERM (an ftlab run checkpoints and stops), awaited and recorded; then KeyboardInterrupt
  is raised again.
  """
  slots = worker_slots(workers, visible_gpus()) if launches else []
  codes, running, queue = [None] * len(launches), {}, list(range(len(launches)))

  def start(i, slot):
    launch = launches[i]
    record = os.path.join(launch.directory, PROCESS_RECORD)
    storage.path(launch.directory).mkdir(parents=True, exist_ok=True)
    storage.write_whole(record, json.dumps({'command': launch.argv}) + '\n')
    env, cpus = slots[slot]
    every_cpu = os.sched_getaffinity(0)
    # The child inherits this thread's CPU set (preexec_fn is unsafe in a threaded process).
    os.sched_setaffinity(0, cpus or every_cpu)
    remote = storage.is_remote(launch.directory)
    log = os.path.join(launch.directory, LOG)
    try:
      with open(log, 'a') if not remote else contextlib.nullcontext() as out:
        stdout = subprocess.PIPE if remote else out
        proc = subprocess.Popen(
          launch.argv, stdout=stdout, stderr=subprocess.STDOUT, env=env, text=True
        )
    finally:
      os.sched_setaffinity(0, every_cpu)
    output, reader = [], None
    if remote:
      reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
      reader.start()
    running[slot] = (i, proc, time.time(), (reader, output))

  def finish(slot):
    i, proc, start_time, (reader, output) = running.pop(slot)
    launch = launches[i]
    if reader:  # the output read to its end, then appended to the log object
      reader.join()
      storage.append_text(os.path.join(launch.directory, LOG), ''.join(output))
    codes[i], seconds = proc.returncode, time.time() - start_time
    record = {'command': launch.argv, 'returncode': codes[i], 'seconds': seconds}
    storage.write_whole(
      os.path.join(launch.directory, PROCESS_RECORD), json.dumps(record, indent=2) + '\n'
    )
    done = sum(c is not None for c in codes)
    status = _status(launch.directory, codes[i], seconds)
    print(f'[{done}/{len(launches)}] {launch.name}: {status}', flush=True)

  try:
    while queue or running:
      for slot in [s for s in range(len(slots)) if s not in running][: len(queue)]:
        start(queue.pop(0), slot)
      time.sleep(0.2)
      for slot in [s for s, (_, proc, *_) in running.items() if proc.poll() is not None]:
        finish(slot)
  except KeyboardInterrupt:
    for _, proc, *_ in running.values():
      proc.send_signal(signal.SIGTERM)
    for slot in list(running):
      running[slot][1].wait()
      finish(slot)
    raise
  return codes
